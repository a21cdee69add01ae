"""Versions built from versions: a new version whose manifest references shards other versions
already committed (manifest layout 2), without copying them.

`compose_version` joins whole versions of datasets under one root (`datasets compose`); a run
with `output.base` (tasks/publish.py) puts its new shards on top of a base version (`on_base`,
`merge_stats`). Every referenced file keeps its root-relative key
(`file_key`: a layout-1 source's `<A>/v0003/data/…` lies under a committed version prefix, which gc
never removes; a layout-2 source's data key is listed by the new manifest, so gc keeps it too).
ShardInfo rows/bytes/sha256 are copied from the source manifests, and so is `ShardInfo.audio`
(audio stored once): a referenced or filtered shard names the same audio file as its source (a
filtered shard's ids are a subset of its source's, so the file holds them all), never a copy.

Bytes read: the `id` and `dataset` columns of every referenced shard (ids must be unique across
the new version; a duplicate names both sources). Bytes written: only shards mixing an excluded
dataset with others, rewritten once, filtered, under `<target>/data/compose-<token>/`.
Stats are summed from the sources less the excluded rows (rows, quarantine, hours, transcripts,
attribute counts); qc_failures, recordings_cut and segments stay the sources' sums.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.arrow import schema_from_b64
from schemas.manifest import Manifest, ModelInfo, ShardInfo, Stats
from storage.layout import data_key
from storage.objectstore import ObjectStore
from storage.shards import write_parquet_shard
from storage.verify import schema_difference
from storage.versions import LAYOUT_DATA_KEYS, commit_version, file_key, read_manifest, resolve_version

_STAT_COLUMNS = ["duration_s", "transcript", "attributes"]


class ComposeError(RuntimeError):
    """The sources cannot form one version (duplicate ids, different row schemas); nothing was committed."""


@dataclass(frozen=True)
class Part:
    """One committed version whose files a new version references."""

    label: str  # "A@v0003"
    manifest: Manifest


def load_part(store: ObjectStore, dataset: str, ref: str) -> Part:
    """Resolve DATASET@REF on `store` (raises VersionNotFound if it is not committed)."""
    version = resolve_version(store, dataset, ref)
    return Part(f"{dataset}@{version}", read_manifest(store, dataset, version))


@dataclass
class Excluded:
    """What the left-out rows of excluded datasets contributed to their sources' stats."""

    rows: int = 0
    quarantined: int = 0
    audio_seconds: float = 0.0
    without_transcript: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    attributes: dict[str, Counter[str]] = field(default_factory=dict)


@dataclass
class Selection:
    """The files a new version lists, where each came from, and the ids seen (id → origin)."""

    shards: list[ShardInfo] = field(default_factory=list)
    quarantine: list[ShardInfo] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)
    excluded: Excluded = field(default_factory=Excluded)
    rewritten: int = 0


def _read(store: ObjectStore, key: str, columns: list[str] | None) -> pa.Table:
    fs, base = store.arrow_fs()
    return pq.read_table(f"{base}/{key}", filesystem=fs, columns=columns)


def add_ids(selection: Selection, ids: Iterable[str], origin: str) -> None:
    """Record `ids` as coming from `origin`; a duplicate is a ComposeError naming both places."""
    for row_id in ids:
        first = selection.ids.get(row_id)
        if first is None:
            selection.ids[row_id] = origin
            continue
        raise ComposeError(f"duplicate row id {row_id!r}: in {first} and in {origin}; a version's ids are "
                           "unique (leave one source's corpus out with --exclude-dataset)")


def _count_excluded(excluded: Excluded, table: pa.Table, quarantine: bool) -> None:
    if quarantine:
        excluded.quarantined += table.num_rows
        excluded.by_reason.update(str(r) for r in table.column("reason_code").to_pylist())
        return
    excluded.rows += table.num_rows
    excluded.audio_seconds += sum(d or 0.0 for d in table.column("duration_s").to_pylist())
    excluded.without_transcript += sum(not t for t in table.column("transcript").to_pylist())
    for attrs in table.column("attributes").to_pylist():
        for key, word in (json.loads(attrs) if isinstance(attrs, str) else attrs or {}).items():
            excluded.attributes.setdefault(key, Counter())[word] += 1


def _rewritten_key(target: str, token: str, kind: str, index: int) -> Callable[[str], str]:
    """Where a filtered copy goes: a data key of the target's `compose-<token>` pseudo-run."""
    return lambda sha: data_key(target, f"compose-{token}", kind, index, sha)


def select_shards(store: ObjectStore, parts: list[Part], *, exclude: set[str], target: str, token: str,
                  selection: Selection | None = None) -> Selection:
    """The shards and quarantine parts of `parts` less the rows of `exclude` datasets: whole files
    whose rows are all excluded are left out, mixed ones rewritten once (filtered) under
    `<target>/data/compose-<token>/`. Reads the id and dataset columns; raises ComposeError on a
    duplicate id."""
    sel = selection or Selection()
    for part in parts:
        for quarantine, infos in ((False, part.manifest.shards), (True, part.manifest.quarantine)):
            for info in infos:
                key = file_key(part.manifest, info)
                origin = f"{part.label} {key}"
                cols = _read(store, key, ["dataset"] if quarantine else ["id", "dataset"])
                drop = pc.is_in(cols.column("dataset"), value_set=pa.array(sorted(exclude), pa.string()))
                n_drop = int(pc.sum(drop).as_py() or 0) if exclude else 0
                audio = None if info.audio is None else \
                    info.audio.model_copy(update={"path": file_key(part.manifest, info.audio)})
                if n_drop == 0:
                    kept, listed = cols, info.model_copy(update={"path": key, "audio": audio})
                else:
                    whole = _read(store, key, None)
                    _count_excluded(sel.excluded, whole.filter(drop), quarantine)
                    if n_drop == cols.num_rows:
                        continue  # every row excluded: the file is left out
                    kept = whole.filter(pc.invert(drop))
                    kind = "quarantine" if quarantine else "train"
                    index = len(sel.quarantine if quarantine else sel.shards)
                    # A filtered copy keeps its audio file: the rows are a subset of the ids it holds.
                    listed = write_parquet_shard(store, _rewritten_key(target, token, kind, index), kept)
                    listed = listed.model_copy(update={"audio": audio})
                    sel.rewritten += 1
                    origin = f"{part.label} {key} (filtered to {listed.path})"
                if quarantine:
                    sel.quarantine.append(listed)
                else:
                    add_ids(sel, (str(i) for i in kept.column("id").to_pylist()), origin)
                    sel.shards.append(listed)
    return sel


def check_new_ids(store: ObjectStore, selection: Selection, shards: list[ShardInfo], label: str) -> None:
    """A run's new shards (data keys) against the ids already selected: a duplicate names both."""
    for info in shards:
        add_ids(selection, (str(i) for i in _read(store, info.path, ["id"]).column("id").to_pylist()),
                f"{label} {info.path}")


def on_base(store: ObjectStore, base: Part, new_shards: list[ShardInfo], *, target: str, run_id: str) -> Selection:
    """A run's version on top of `base` (`output.base`): the base's files less the rows of every
    corpus the run's new shards hold (replaced), then the new shards' ids checked against the rest."""
    produced: set[str] = set()
    for info in new_shards:
        produced.update(str(d) for d in _read(store, info.path, ["dataset"]).column("dataset").to_pylist())
    selection = select_shards(store, [base], exclude=produced, target=target, token=run_id)
    check_new_ids(store, selection, new_shards, f"this run ({run_id})")
    return selection


def common_schema(parts: list[Part], expected: str | None = None) -> str:
    """The row schema (base64) every part shares (and `expected`, if given); else a ComposeError."""
    first = expected if expected is not None else parts[0].manifest.arrow_schema
    reference = schema_from_b64(first)
    for part in parts:
        diff = schema_difference(schema_from_b64(part.manifest.arrow_schema), reference)
        if diff is not None:
            against = "this speechpairs' rows" if expected is not None else parts[0].label
            raise ComposeError(f"{part.label} has another row schema than {against} ({diff.removeprefix('schema ')}); "
                               "only versions with the same row schema join: re-run the older version's "
                               "config.yaml with this speechpairs (`speechpairs run --config …`) first")
    return first


def merge_stats(stats: Iterable[Stats], excluded: Excluded) -> Stats:
    """The sources' stats summed, less what the excluded rows contributed."""
    total: dict[str, Any] = {"clips_in": 0, "rows": 0, "quarantined": 0, "audio_hours": 0.0,
                             "rows_without_transcript": 0, "recordings_cut": 0, "segments": 0}
    by_reason: Counter[str] = Counter()
    qc: Counter[str] = Counter()
    attrs: dict[str, Counter[str]] = {}
    for s in stats:
        for name in total:
            total[name] += getattr(s, name)
        by_reason.update(s.quarantine_by_reason)
        qc.update(s.qc_failures)
        for key, counts in s.attribute_counts.items():
            attrs.setdefault(key, Counter()).update(counts)
    by_reason.subtract(excluded.by_reason)
    for key, counts in excluded.attributes.items():
        attrs.setdefault(key, Counter()).subtract(counts)
    return Stats(
        clips_in=total["clips_in"] - excluded.rows - excluded.quarantined,
        rows=total["rows"] - excluded.rows,
        quarantined=total["quarantined"] - excluded.quarantined,
        quarantine_by_reason={k: v for k, v in sorted(by_reason.items()) if v > 0},
        audio_hours=round(max(0.0, total["audio_hours"] - excluded.audio_seconds / 3600), 6),
        rows_without_transcript=total["rows_without_transcript"] - excluded.without_transcript,
        recordings_cut=total["recordings_cut"], segments=total["segments"],
        qc_failures=dict(sorted(qc.items())),
        attribute_counts={k: {w: n for w, n in v.most_common() if n > 0} for k, v in attrs.items()
                          if any(n > 0 for n in v.values())},
    )


def _shared(values: Iterable[str]) -> str:
    found = set(values)
    return found.pop() if len(found) == 1 else "mixed"


def compose_version(store: ObjectStore, target: str, parts: list[Part], *, exclude: Iterable[str] = (),
                    code_version: str) -> Manifest:
    """Commit the next version of `target` listing every (kept) shard of `parts`; see the module doc."""
    if not parts:
        raise ValueError("compose needs at least one source version")
    labels = [p.label for p in parts]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a source is given twice: {', '.join(labels)}")
    excluded_sets = sorted(set(exclude))
    schema = common_schema(parts)
    token = uuid.uuid4().hex[:12]
    selection = select_shards(store, parts, exclude=set(excluded_sets), target=target, token=token)
    record = {"compose": {"from": labels, "exclude_datasets": excluded_sets}}
    lineages = [p.manifest.lineage for p in parts]
    models = list({(m.role, m.name, m.revision): m for lin in lineages for m in lin.models}.values())
    lineage = {
        "run_id": f"compose-{token}",
        "code_version": code_version,
        "config_hash": hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16],
        "bins_version": _shared(lin.bins_version for lin in lineages),
        "prompt_pool_hash": _shared(lin.prompt_pool_hash for lin in lineages),
        "models": [ModelInfo.model_validate(m.model_dump()) for m in models],
        "parents": labels,
    }
    return commit_version(
        store, dataset=target, staged_shards=selection.shards, staged_quarantine=selection.quarantine,
        lineage=lineage, stats=merge_stats((p.manifest.stats for p in parts), selection.excluded),
        arrow_schema_b64=schema, hf_features=parts[0].manifest.hf_features, config=record,
        layout=LAYOUT_DATA_KEYS)
