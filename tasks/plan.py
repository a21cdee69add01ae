"""Shard planning: sorted stable ids cut into shards, recorded once per run in staging.

Shards are cut in sorted id order at `output.shard_size` clips or, for long recordings, at the
audio time of that many clips of `audio.max_duration_s` (whichever comes first), so a shard of
recordings carries about the audio of a full shard of clips (`audio_units`): a recording the shard
task may cut is weighed by its length (folders, manifests and corpus layouts: size, then header,
local, s3:// or http(s)://, range reads only; lhotse: the manifest's durations; hf_parquet and
`segment: never` sources: by count). A pre-cut corpus (no clip longer than the cap) is planned
exactly by count.

The plan is written before any shard runs and reused on every re-run of the same run id, so a
resumed run never re-partitions (checkpoints would no longer match).
Only light `ClipRef`s are held while sorting, never whole records or audio.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field

from schemas.config import RunConfig, SourceConfig
from schemas.records import utc_now
from storage import sources as stores
from storage.layout import RunLayout
from storage.objectstore import NotFound, ObjectStore, PreconditionFailed
from tasks.ingest import (
    ADAPTERS,
    ClipRef,
    SourceError,
    dataset_name,
    iter_refs,
    remote,
    source_kind,
    source_roots,
)
from tasks.ingest.common import AUDIO_SUFFIXES, PROBLEM, path_of
from tasks.ingest.folder import skipped_files
from tasks.ingest.manifest import iter_manifest_records, record_to_clip
from tasks.segment.blocks import header_duration

PLAN_FORMAT = "speechpairs/plan@1"


class RunPlan(BaseModel):
    format: str = PLAN_FORMAT
    run_id: str
    config_hash: str
    clips: int
    shards: int
    shard_size: int
    duplicates: int = 0
    # Planned clips weighed as long recordings (shards cut by audio time around them; 0: by count only).
    long_recordings: int = 0
    # Folder sources' files that are not audio (nor .txt/.lab sidecars), by extension: reported, not clips.
    skipped_files: dict[str, int] = Field(default_factory=dict)
    # Folders a walk could not enter (unreadable, a link loop, a link outside the roots), by reason:
    # each is also one quarantine row `<dataset>/<relative dir>/` (counted in `clips`).
    unentered_folders: dict[str, int] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utc_now)


class ShardPlan(BaseModel):
    index: int
    of: int
    refs: list[ClipRef]
    created_at: datetime | None = None  # the run's planned-at time (None in plans from before it existed)


def plan_run(config: RunConfig, store: ObjectStore, prefix: str, run_id: str) -> RunPlan:
    """Load the run's plan if it exists, else make it: shard files first, plan.json last."""
    existing = load_plan(store, prefix)
    if existing is not None:
        return existing
    # Plain tuples while sorting, not models (memory: docs/decisions.md); ties (duplicate ids) keep
    # source order, clip-list row offsets compared as numbers, not as text.
    keys = sorted((r.id, r.source, int(r.locator) if r.locator.isdigit() else -1, r.locator)
                  for r in iter_refs(config.sources))
    skipped = count_skipped_files(config)
    if not keys:
        raise SourceError("the sources list no clips: " + ", ".join(s.path for s in config.sources)
                          + f"; check the paths and that folders hold audio ({' '.join(AUDIO_SUFFIXES)})"
                          + (f"; skipped non-audio files: {skipped_text(skipped)}" if skipped else ""))
    is_dup = [i > 0 and keys[i][0] == keys[i - 1][0] for i in range(len(keys))]
    size = config.output.shard_size
    long = audio_units(config, [(k[1], k[3]) for k in keys])
    bounds = shard_bounds([long.get((k[1], k[3]), 1.0) for k in keys] if long else None, len(keys), size)
    count = len(bounds)
    planned_at = utc_now()
    for index, (start, end) in enumerate(bounds):
        refs = [ClipRef(id=k[0], source=k[1], locator=k[3], duplicate=is_dup[start + j])
                for j, k in enumerate(keys[start:end])]
        shard = ShardPlan(index=index, of=count, refs=refs, created_at=planned_at)
        store.put_bytes(RunLayout(prefix).shard_plan(index), shard.model_dump_json().encode())
    unentered = Counter(k[3].split(PROBLEM, 2)[1] for k in keys if k[3].startswith(PROBLEM) and k[0].endswith("/"))
    plan = RunPlan(run_id=run_id, config_hash=config.config_hash(), clips=len(keys), shards=count,
                   shard_size=size, duplicates=sum(is_dup), skipped_files=skipped, created_at=planned_at,
                   long_recordings=sum(1 for k in keys if (k[1], k[3]) in long),
                   unentered_folders=dict(sorted(unentered.items(), key=lambda kv: (-kv[1], kv[0]))))
    try:
        store.put_bytes(RunLayout(prefix).plan, plan.model_dump_json(indent=2).encode(), if_none_match=True)
    except PreconditionFailed:
        # Another launcher of the same run planned concurrently: the first plan wins, for both.
        winner = load_plan(store, prefix)
        assert winner is not None
        return winner
    return plan


def shard_bounds(units: list[float] | None, n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each shard over `n` sorted clips: a shard closes at `size` clips, or before a
    clip that would take its audio past `size` units (one unit = audio.max_duration_s; a clip that
    cannot be long is one unit, so without long recordings (`units` None) this is a cut every
    `size` clips). A shard holds at least one clip: a recording over the budget sits alone."""
    if units is None:
        return [(start, min(start + size, n)) for start in range(0, n, size)]
    bounds: list[tuple[int, int]] = []
    start, load = 0, 0.0
    for i, unit in enumerate(units):
        if i > start and (i - start >= size or load + unit > size):
            bounds.append((start, i))
            start, load = i, 0.0
        load += unit
    bounds.append((start, n))
    return bounds


# Planning weighs a clip by its audio time only when its size says it could be longer than
# audio.max_duration_s at the lowest bitrate its format plausibly has (bytes per second): below that
# it is one unit without opening it, so a million short clips cost a stat (or a listing) each, no read.
# WAV-family floor: 4-bit ADPCM at 8 kHz; FLAC: lossless 8-kHz speech; else 8 kbit/s (low-rate speech codecs).
MIN_BYTES_PER_S = {".wav": 4000, ".aif": 4000, ".aiff": 4000, ".au": 4000, ".w64": 4000, ".caf": 4000,
                   ".flac": 2000}
LOW_BYTES_PER_S = 1000
# Formats without a header length read cheaply (MP3, M4A, Opus, ...): audio time = bytes / 64 kbit/s.
ESTIMATE_BYTES_PER_S = 8000
HEADER_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".aif", ".aiff", ".au", ".w64", ".caf"})
# Remote Ogg is estimated: libsndfile reads its last page for the length (a second range GET).
REMOTE_HEADER_SUFFIXES = HEADER_SUFFIXES - {".ogg"}


def audio_units(config: RunConfig, locators: list[tuple[int, str]]) -> dict[tuple[int, str], float]:
    """(source index, locator) → audio time in units of audio.max_duration_s, for the planned clips
    that are long recordings (more than one unit) of sources whose segment mode is not `never`.

    What is weighed is what the shard task may cut (tasks/segment/clips.py): a clip pointing at a
    file of at most audio.max_file_bytes, local, s3:// or http(s)://.
    - Folders, manifests and the corpus layouts (`Adapter.audio`: locator → file; Common Voice reads
      its TSVs once): a file's size first (local: a stat; s3://: the listing of the source root, or
      of the file's folder for a manifest's audio elsewhere, one per folder, cached; http(s)://: a HEAD);
      at most the size floor, nothing is read. Past it, the header's length (`header_duration`: one
      64 KiB range GET for a remote file, no stat), else bytes / ESTIMATE_BYTES_PER_S (MP3, M4A, ...).
    - lhotse (`Adapter.seconds`): the manifest's durations of clips that are whole recordings; no
      audio is opened. A clip of part of a recording is embedded, never cut: one unit.
    - hf_parquet: by count. Its audio is embedded in the rows (never cut), and a path-only row's
      length would cost a read per row.
    A misweighed recording is still cut in its shard; only balance suffers. Deterministic: the same
    files give the same units, local or remote."""
    units: dict[tuple[int, str], float] = {}
    cap = config.audio.max_duration_s
    planned: dict[int, list[str]] = {}
    for index, locator in locators:
        if not locator.startswith(PROBLEM):
            planned.setdefault(index, []).append(locator)
    listed: set[str] = set()  # s3:// folders listed for sizes in this planning
    for index, source in enumerate(config.sources):
        if config.segment_for(source).mode == "never" or index not in planned:
            continue
        for locator, seconds in _recording_seconds(config, index, planned[index], listed):
            if seconds > cap:
                units[(index, locator)] = seconds / cap
    return units


def _recording_seconds(config: RunConfig, index: int, locators: list[str],
                       listed: set[str]) -> Iterator[tuple[str, float]]:
    """(locator, audio seconds) of the source's planned clips that may be long (see audio_units)."""
    source = config.sources[index]
    kind = source_kind(source, index)
    adapter = ADAPTERS.get(kind)
    remote = stores.is_remote(source.path)
    files: Iterator[tuple[str, str]]
    if adapter is not None and adapter.seconds is not None:
        yield from adapter.seconds(path_of(source.path))
        return
    if kind == "folder":
        files = ((loc, f"{source.path.rstrip('/')}/{loc}" if remote else str(Path(source.path) / loc))
                 for loc in locators)
    elif kind == "manifest":
        files = _manifest_audio(source, index)
    elif adapter is not None and adapter.audio is not None:
        roots = source_roots(source, index)
        checked = ((loc, roots.check(str(path))) for loc, path in adapter.audio(path_of(source.path), locators))
        files = ((loc, path) for loc, path in checked if isinstance(path, str))
    else:
        return
    if remote and kind != "manifest":
        _list_once(source.path, listed)  # every file below the root: sizes from one listing
    for locator, uri in files:
        seconds = _audio_seconds(uri, config.audio.max_duration_s, config.audio.max_file_bytes, listed)
        if seconds is not None:
            yield locator, seconds


def _list_once(folder: str, listed: set[str]) -> None:
    """List an s3:// folder once (cached by tasks/ingest/remote.py), unless a listed folder holds it."""
    folder = folder.rstrip("/")
    if folder.startswith("s3://") and not any(folder == f or folder.startswith(f + "/") for f in listed):
        try:
            remote.listing(folder)
        except stores.SourceReadError:
            return
        listed.add(folder)


def _manifest_audio(source: SourceConfig, index: int) -> Iterator[tuple[str, str]]:
    """(locator, audio path or URI) of each manifest row (one sequential pass, no audio opened)."""
    remote = stores.is_remote(source.path)
    manifest: Path | str = source.path if remote else Path(source.path)
    base: Path | str = stores.parent(source.path) if remote else Path(source.path).parent
    roots, name = source_roots(source, index), dataset_name(source)
    for offset, record in iter_manifest_records(manifest):
        clip = record_to_clip(record, clip_id="plan", dataset=name, base=base, language=None,
                              extra_labels={}, where=str(manifest), roots=roots)
        uri = clip.audio_uri
        if clip.ingest_error is None and (stores.is_remote(uri) or "://" not in uri):
            yield str(offset), uri


def _size(uri: str, listed: set[str]) -> int | None:
    """The file's size: a stat (local), the folder's listing (s3://), a HEAD (http(s)://); None if absent."""
    if not stores.is_remote(uri):
        try:
            st = os.stat(uri)
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None  # never a FIFO or device
    _list_once(stores.parent(uri), listed)
    try:
        found = remote.entry(uri)
    except stores.SourceReadError:
        return None
    return None if found is None else found.size


def _audio_seconds(uri: str, cap: float, max_bytes: int, listed: set[str]) -> float | None:
    """The clip's audio time if it may exceed `cap`, else None; never raises (ingest names problems).
    A file over audio.max_file_bytes is not cut (it is quarantined whole): None."""
    suffix = PurePosixPath(uri).suffix.lower()
    size = _size(uri, listed)
    if size is None or size <= cap * MIN_BYTES_PER_S.get(suffix, LOW_BYTES_PER_S) or size > max_bytes:
        return None
    if suffix in (REMOTE_HEADER_SUFFIXES if stores.is_remote(uri) else HEADER_SUFFIXES):
        seconds = header_duration(uri, size)
        if seconds is not None and seconds > 0:
            return seconds
    return size / ESTIMATE_BYTES_PER_S


def count_skipped_files(config: RunConfig) -> dict[str, int]:
    """Extension → count of the files folder sources leave out, most frequent first.

    A second listing of each folder (the ref walk stays the adapters' own); listing is cheap next
    to the per-file stat the source fingerprint already does. An s3:// folder: one listing too.
    """
    counts: Counter[str] = Counter()
    for source in config.sources:
        if source_kind(source) == "folder":
            counts.update(skipped_files(source.path))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def skipped_text(counts: dict[str, int]) -> str:
    """`3 (.pdf=2, .docx=1)`: the run summary's line for files a folder source skipped (and, by
    reason, for folders a walk could not enter)."""
    total = sum(counts.values())
    return f"{total} ({', '.join(f'{ext}={n}' for ext, n in counts.items())})" if total else "0"


def load_plan(store: ObjectStore, prefix: str) -> RunPlan | None:
    try:
        return RunPlan.model_validate(json.loads(store.get_bytes(RunLayout(prefix).plan)))
    except NotFound:
        return None


def load_shard_plan(store: ObjectStore, prefix: str, index: int) -> ShardPlan:
    return ShardPlan.model_validate(json.loads(store.get_bytes(RunLayout(prefix).shard_plan(index))))
