"""Lhotse manifests read directly (no lhotse install): cuts, or recordings with supervisions.

A source is one manifest file (`.jsonl` or `.jsonl.gz`) or a folder of them:
- a cuts manifest (`*cuts*`): one clip per cut (MonoCut / MultiCut with its recording inline);
- a recordings manifest (`*recordings*`): one clip per supervision of the sibling supervisions
  manifest (same name with `supervisions`), or one clip per recording when there is none;
- a supervisions manifest: paired with its sibling recordings manifest (which must exist);
- a folder: every cuts manifest in it, or, when it has none, every recordings manifest as above.

Clip ids are the cut / supervision / recording ids. A clip that covers part of a recording (offset,
duration shorter than the file, or one channel of several) is cut out when the clip is loaded and
carried as embedded FLAC (`Clip.audio_bytes`); a whole-file clip just points at the file.

Which supervisions speak for a cut: only those lying inside it (within SUPERVISION_TOLERANCE_S, on
one of its channels). lhotse's `trim_to_supervisions()` keeps overlapping neighbours by default
(`keep_overlapping=True`), and a `truncate`/`split` slice keeps the supervisions it cuts through;
such partial ones never add text, speakers or labels. One supervision inside: its text and labels
are the clip's. Several: the clip gets one span per supervision (`Clip.spans`, time order, each
with its text, speaker and labels), the transcript is their texts joined, and a label is the
clip's only when every span agrees on it (`sources[].multi_speaker: quarantine` drops clips with
several speakers instead). Labels, verbatim: recording_id, the supervision's speaker, gender and
every scalar in its `custom`, then every scalar in the cut's `custom`; `language` as written.
Seed labels by default: every scalar supervision `custom` key that is not a canonical attribute
(gender, emotion, age, accent), under its own name (`dialog_act` → `Dialog act`); cut-level
`custom` is bookkeeping (splits, origins) and stays out of the seed unless `seed_labels` names it.

Random access: each row is found again by its byte offset in the uncompressed stream. A `.jsonl.gz`
is decompressed once per machine into a cache file (`$TMPDIR/speechpairs-lhotse/`, keyed by path,
mtime and size; an s3:// one by URI, ETag and size) the first time a shard loads from it.

On s3:// (a manifest URI or a prefix of them): manifests are streamed by range requests, a row is
re-read by one range request (plain .jsonl), relative audio paths resolve against the manifest's
own folder, and a segment is cut from its recording by range reads (never a whole-corpus copy).

Audio is read only below the manifest's folder and `sources[N].allowed_roots`: recordings often hold
absolute paths from wherever lhotse ran, and such a clip is `path_outside_root` (its message names
the folder to add to allowed_roots). A relative path is tried against the manifest folder, its
parents and the cwd, but only where that lands inside the roots.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf

from schemas.attributes import SeedLabel, display_name
from schemas.records import Clip, QuarantineError, ReasonCode, Segment
from storage.sources import join
from tasks.audio import open_regular
from tasks.features.labels import is_attribute_label
from tasks.ingest.common import (
    ClipRef,
    CorpusPath,
    SourceError,
    clean_label_value,
    make_id,
    one_line,
    parse_json_object,
    path_of,
    read_line,
    too_long_line,
)
from tasks.ingest.files import FileKey, folder_names, metadata_key, open_source
from tasks.ingest.paths import Rejected, Roots, prepare
from tasks.llm.messages import sanitize_prompt_text

MANIFEST_ENDINGS = (".jsonl.gz", ".jsonl")
KINDS = ("cuts", "supervisions", "recordings")
WHOLE_FILE_TOLERANCE_S = 0.025  # lhotse's own duration-mismatch tolerance
SUPERVISION_TOLERANCE_S = 0.025  # how far a supervision may stick out of a cut and still be inside it
MAX_LINE_BYTES = 64 * 1024 * 1024  # one cut (a long recording's cut may list thousands of supervisions)
LHOTSE_HINT = "lhotse manifests keep the audio paths of the machine that prepared them"


def manifest_kind(name: str) -> str | None:
    """'cuts' / 'supervisions' / 'recordings' for a lhotse manifest file name, else None."""
    low = name.lower()
    if not low.endswith(MANIFEST_ENDINGS):
        return None
    return next((kind for kind in KINDS if kind in low), None)


def is_lhotse_manifest(path: Path) -> bool:
    """Unambiguous for `auto`: a gzipped JSONL whose name says cuts, supervisions or recordings."""
    return path.is_file() and path.name.lower().endswith(".jsonl.gz") and manifest_kind(path.name) is not None


def manifest_stem(name: str) -> str:
    for ending in MANIFEST_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def _sibling(path: CorpusPath, src: str, dst: str) -> CorpusPath:
    return path.with_name(path.name.replace(src, dst).replace(src.capitalize(), dst.capitalize()))


@dataclass(frozen=True)
class Unit:
    """One thing to read: a cuts file, or a recordings file with its supervisions file (or None)."""

    kind: str  # "cuts" | "recordings"
    main: CorpusPath
    supervisions: CorpusPath | None = None


def manifest_units(path: CorpusPath) -> list[Unit]:
    """The manifests a source stands for, in sorted order; raises SourceError naming what is missing."""
    if path.is_dir():
        # Regular files only: a FIFO named cuts_x.jsonl would block the run when opened.
        names = sorted(n for n in folder_names(path) if not n.startswith(".") and manifest_kind(n)
                       and (path / n).is_file())
        cuts = [Unit("cuts", path / n) for n in names if manifest_kind(n) == "cuts"]
        if cuts:
            return cuts
        recs = [path / n for n in names if manifest_kind(n) == "recordings"]
        if not recs:
            raise SourceError(f"{path}: no lhotse manifests (*cuts*.jsonl[.gz] or *recordings*.jsonl[.gz]); "
                              "point sources[].path at a manifest file or the folder lhotse wrote them to")
        return [_recordings_unit(r) for r in recs]
    kind = manifest_kind(path.name)
    if kind == "cuts":
        return [Unit("cuts", path)]
    if kind == "recordings":
        return [_recordings_unit(path)]
    if kind == "supervisions":
        rec = _sibling(path, "supervisions", "recordings")
        if not rec.is_file():
            raise SourceError(f"{rec}: missing lhotse recordings manifest for {path.name}; supervisions alone "
                              "do not say where the audio is: put the recordings manifest next to it, or "
                              "point sources[].path at a cuts manifest")
        return [Unit("recordings", rec, path)]
    raise SourceError(f"{path}: not a lhotse manifest name (it must end in .jsonl or .jsonl.gz and contain "
                      f"one of {list(KINDS)})")


def _recordings_unit(rec: CorpusPath) -> Unit:
    sup = _sibling(rec, "recordings", "supervisions")
    return Unit("recordings", rec, sup if sup.is_file() else None)


def manifest_files(path: CorpusPath) -> list[CorpusPath]:
    """Every file the source reads (for the run's source fingerprint)."""
    out: list[CorpusPath] = []
    for unit in manifest_units(path):
        out.append(unit.main)
        if unit.supervisions is not None:
            out.append(unit.supervisions)
    return out


@contextmanager
def _open(path: CorpusPath) -> Iterator[BinaryIO]:
    """The manifest's uncompressed bytes: a local file, or range reads of an s3:// object."""
    with open_source(path) as raw:
        if not path.name.lower().endswith(".gz"):
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped  # type: ignore[misc]


def iter_lines(path: CorpusPath) -> Iterator[tuple[int, bytes]]:
    """(uncompressed byte offset, line) for every non-blank line; a line above MAX_LINE_BYTES comes
    back as b"" (never held in memory), so its row is reported instead of read."""
    offset = 0
    with _open(path) as f:
        while True:
            line, size = read_line(f, MAX_LINE_BYTES)  # type: ignore[arg-type]
            if not size:
                return
            if line.strip() or not line:
                yield offset, line
            offset += size


def _parse(line: bytes, where: str) -> dict[str, Any] | str:
    if not line:
        return f"{where}: {too_long_line(None, MAX_LINE_BYTES)}" if where else "too long"
    return parse_json_object(line, where)


def _rel(path: CorpusPath, root: CorpusPath) -> str:
    base = root if root.is_dir() else root.parent
    if isinstance(path, Path) and isinstance(base, Path):
        return path.relative_to(base).as_posix()
    return str(path)[len(str(base).rstrip("/")) + 1:]


def iter_lhotse_refs(root: CorpusPath, source_index: int, dataset: str, *,
                     roots: Roots | None = None) -> Iterator[ClipRef]:
    """Locators: `<offset>@<file>` (cuts, recordings), `<sup offset>@<file>|<rec offset>@<file>`."""
    for unit in manifest_units(root):
        main = _rel(unit.main, root)
        if unit.kind == "cuts" or unit.supervisions is None:
            for offset, line in iter_lines(unit.main):
                yield ClipRef(id=make_id(dataset, _record_id(_parse(line, ""), f"{main}@{offset}")),
                              source=source_index, locator=f"{offset}@{main}")
            continue
        # Supervisions point at recordings by id: remember each recording's offset (ids only, not records).
        rec_offsets: dict[str, int] = {}
        for offset, line in iter_lines(unit.main):
            rec_offsets.setdefault(_record_id(_parse(line, ""), ""), offset)
        sup = _rel(unit.supervisions, root)
        for offset, line in iter_lines(unit.supervisions):
            record = _parse(line, "")
            rec_id = str(record.get("recording_id", "")) if isinstance(record, dict) else ""
            rec_off = rec_offsets.get(rec_id, -1)
            yield ClipRef(id=make_id(dataset, _record_id(record, f"{sup}@{offset}")), source=source_index,
                          locator=f"{offset}@{sup}|{rec_off}@{main}")


def _record_id(record: dict[str, Any] | str, fallback: str) -> str:
    if isinstance(record, dict) and record.get("id") not in (None, ""):
        return str(record["id"])
    return f"row@{fallback}"


# ---------------------------------------------------------------- random access


@lru_cache(maxsize=16)
def _plain_copy(key: FileKey) -> str:
    """An uncompressed copy of a .jsonl.gz (made once, atomically), so rows can be found by offset."""
    cache = Path(tempfile.gettempdir()) / "speechpairs-lhotse"
    cache.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".jsonl"
    target = cache / name
    if not target.is_file():
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, _open(path_of(key[0])) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return str(target)


def read_line_at(path: CorpusPath, offset: int) -> bytes:
    key = metadata_key(path, "lhotse manifest", "it was there at planning: restore it or re-run")
    plain = path_of(_plain_copy(key)) if path.name.lower().endswith(".gz") else path
    with open_source(plain, buffer_size=1 << 16) as f:
        f.seek(offset)
        return read_line(f, MAX_LINE_BYTES)[0]


# ---------------------------------------------------------------- records → clips


def load_lhotse_clip(root: CorpusPath, locator: str, *, clip_id: str, dataset: str, language: str | None,
                     extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    base = root if root.is_dir() else root.parent
    roots = roots or Roots.of(root)
    first, _, second = locator.partition("|")
    off, _, name = first.partition("@")
    path = base / name
    where = f"{path} at byte {off}"
    record = _parse(read_line_at(path, int(off)), where)

    def bad(message: str) -> Clip:
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, message))

    if isinstance(record, str):
        return bad(record)
    kind = manifest_kind(name)
    if kind == "cuts":
        return _cut_clip(record, base, where, clip_id, dataset, language, extra_labels, bad, roots)
    if not second:  # a recording without supervisions: the whole recording
        return _make_clip(record, [], 0.0, None, None, {}, base, where, clip_id, dataset, language, extra_labels,
                          bad, roots)
    rec_off, _, rec_name = second.partition("@")
    if int(rec_off) < 0:
        return bad(f"{where}: supervision {record.get('id')!r} refers to recording {record.get('recording_id')!r}, "
                   f"which is not in {base / rec_name}")
    rec_where = f"{base / rec_name} at byte {rec_off}"
    recording = _parse(read_line_at(base / rec_name, int(rec_off)), rec_where)
    if isinstance(recording, str):
        return bad(recording)
    start = float(record.get("start") or 0.0)
    duration = _float(record.get("duration"))
    sup = dict(record, start=0.0)  # relative to the clip, like a cut's supervisions
    return _make_clip(recording, [sup], start, duration, record.get("channel"), {}, base, where, clip_id,
                      dataset, language, extra_labels, bad, roots)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _cut_clip(cut: dict[str, Any], base: CorpusPath, where: str, clip_id: str, dataset: str, language: str | None,
              extra_labels: dict[str, str], bad: Callable[[str], Clip], roots: Roots) -> Clip:
    cut_type = cut.get("type") or ("MixedCut" if "tracks" in cut else "MonoCut")
    recording = cut.get("recording")
    if cut_type not in ("MonoCut", "MultiCut") or not isinstance(recording, dict):
        return bad(f"{where}: {cut_type} {cut.get('id')!r} has no single recording (mixed or padding cuts are not "
                   "read); export the cuts before mixing/padding, or use a recordings+supervisions manifest")
    sups = [s for s in cut.get("supervisions") or [] if isinstance(s, dict)]
    custom = cut.get("custom") if isinstance(cut.get("custom"), dict) else {}
    return _make_clip(recording, sups, float(cut.get("start") or 0.0), _float(cut.get("duration")),
                      cut.get("channel"), custom or {}, base, where, clip_id, dataset, language, extra_labels, bad,
                      roots)


def _scalars(custom: Any) -> dict[str, str]:
    """The scalar entries of a lhotse `custom` dict as label text (lists and dicts are not labels)."""
    out: dict[str, str] = {}
    if isinstance(custom, dict):
        for key, value in custom.items():
            if isinstance(value, (str, int, float, bool)) and clean_label_value(value):
                out[str(key)] = clean_label_value(value)
    return out


def _sup_labels(sup: dict[str, Any]) -> dict[str, str]:
    labels = {key: clean_label_value(sup[key]) for key in ("speaker", "gender")
              if sup.get(key) is not None and clean_label_value(sup[key])}
    return labels | _scalars(sup.get("custom"))


def _channels(value: Any) -> set[int] | None:
    if value is None:
        return None
    try:
        return {int(c) for c in (value if isinstance(value, list) else [value])}
    except (TypeError, ValueError):
        return None


def inside(sups: list[dict[str, Any]], duration: float | None, channel: Any,
           tolerance: float = SUPERVISION_TOLERANCE_S) -> list[dict[str, Any]]:
    """The supervisions lying inside a clip of `duration` (starts relative to the clip) on one of its
    channels, in time order; a partially overlapping neighbour is not inside."""
    wanted = _channels(channel)
    out = []
    for sup in sups:
        start, length = _float(sup.get("start")) or 0.0, _float(sup.get("duration"))
        if start < -tolerance or (duration is not None and length is not None
                                  and start + length > duration + tolerance):
            continue
        theirs = _channels(sup.get("channel"))
        if wanted is not None and theirs is not None and not wanted & theirs:
            continue
        out.append(sup)
    return sorted(out, key=lambda s: (_float(s.get("start")) or 0.0, str(s.get("id", ""))))


def _span(sup: dict[str, Any], duration: float | None) -> Segment:
    start = max(0.0, _float(sup.get("start")) or 0.0)
    end = start + (_float(sup.get("duration")) or 0.0)
    if duration is not None:
        end = min(end, duration)
    return Segment(start_s=start, end_s=end, text=one_line(str(sup.get("text") or "")) or "",
                   speaker=clean_label_value(sup["speaker"]) if sup.get("speaker") is not None else None,
                   labels=_sup_labels(sup))


def _agreed(dicts: list[dict[str, str]]) -> dict[str, str]:
    """The entries every dict has with the same value."""
    if not dicts:
        return {}
    return {k: v for k, v in dicts[0].items() if all(d.get(k) == v for d in dicts[1:])}


def default_seed_labels(sups: list[dict[str, Any]]) -> list[SeedLabel]:
    """Every scalar supervision `custom` key that is no canonical attribute, under its own name."""
    out: list[SeedLabel] = []
    seen: set[str] = set()
    for sup in sups:
        for key in _scalars(sup.get("custom")):
            if is_attribute_label(key) or key.lower() in seen:
                continue
            seen.add(key.lower())
            try:
                entry = SeedLabel(label=key, display=sanitize_prompt_text(display_name(key), "name"))
            except ValueError:  # a key with no usable name (only punctuation): it stays a plain label
                continue
            if entry.display.lower() not in {e.display.lower() for e in out}:
                out.append(entry)
    return out


def _make_clip(recording: dict[str, Any], sups: list[dict[str, Any]], start: float, duration: float | None,
               channel: Any, custom: dict[str, Any], base: CorpusPath, where: str, clip_id: str, dataset: str,
               language: str | None, extra_labels: dict[str, str], bad: Callable[[str], Clip], roots: Roots) -> Clip:
    length = duration if duration is not None else _float(recording.get("duration"))
    own = inside(sups, length, channel)
    spans = [_span(s, length) for s in own]
    labels = dict(extra_labels)
    if recording.get("id"):
        labels["recording_id"] = str(recording["id"])
    labels |= _agreed([s.labels for s in spans]) | _scalars(custom)
    languages = {clean_label_value(s["language"]) for s in own if s.get("language") is not None}
    lang = languages.pop() if len(languages) == 1 else language
    texts = [s.text for s in spans if s.text]
    audio = _audio(recording, start, duration, channel, base, where, roots)
    if isinstance(audio, str):
        return bad(audio)
    if isinstance(audio, Rejected):
        return audio.clip(clip_id, dataset, where)
    uri, data = audio
    return Clip(id=clip_id, dataset=dataset, audio_uri=uri, audio_bytes=data,
                transcript=" ".join(texts) or None, language=lang, labels=labels,
                seed_labels=default_seed_labels(own), spans=spans if len(spans) > 1 else [])


def _resolve(source: str, base: CorpusPath, roots: Roots, where: str) -> str | Rejected:
    """The real path of a recording's audio, or why it is not read. Relative paths are relative to
    where lhotse ran: the manifest folder, its parents and the cwd are tried, but only candidates
    inside `roots` count; one found only outside them is `path_outside_root`, naming the folder.
    In an s3:// manifest a relative path is relative to the manifest's own folder (one URI)."""
    if "\0" in source or "://" in source or Path(source).expanduser().is_absolute():
        return _hinted(roots.check(source, where))
    if not isinstance(base, Path):
        return _hinted(roots.check(join(str(base), source), where))
    p = Path(source).expanduser()
    found_outside: Rejected | None = None
    for folder in (base, *list(base.parents)[:3], Path.cwd()):
        checked = roots.check(str(folder / p), where)
        if isinstance(checked, str):
            if os.path.exists(checked):
                return checked
        elif (found_outside is None and checked.reason is ReasonCode.path_outside_root
              and os.path.lexists(folder / p)):
            found_outside = checked
    if found_outside is not None:
        return _hinted(found_outside)
    return _hinted(roots.check(str(base / p), where))  # missing: the audio stage says missing_file


def _hinted(checked: str | Rejected) -> str | Rejected:
    if isinstance(checked, Rejected) and checked.reason is ReasonCode.path_outside_root:
        return Rejected(checked.reason, f"{checked.message} ({LHOTSE_HINT})")
    return checked


def _audio(recording: dict[str, Any], start: float, duration: float | None, channel: Any, base: CorpusPath,
           where: str, roots: Roots) -> tuple[str, bytes | None] | str | Rejected:
    """(audio uri, embedded bytes or None for the whole file), an error message (bad_row), or a
    rejection with its own reason (a path outside the roots, a FIFO...)."""
    rec_id = recording.get("id")
    transforms = [t for t in recording.get("transforms") or []
                  if not (isinstance(t, dict) and t.get("name") == "Resample")]
    if transforms:
        names = [t.get("name") if isinstance(t, dict) else str(t) for t in transforms]
        return (f"{where}: recording {rec_id!r} has audio transforms {names} (e.g. speed perturbation) that are "
                "not applied here; use the manifest without perturbation")
    sources = [s for s in recording.get("sources") or [] if isinstance(s, dict)]
    wanted = _wanted_channels(recording, channel)[1]
    picked = [s for s in sources if set(wanted) & {int(c) for c in s.get("channels") or [0]}]
    if len(picked) != 1:
        return f"{where}: recording {rec_id!r} has no single audio source for channel(s) {wanted}"
    src = picked[0]
    src_type, value = src.get("type"), src.get("source")
    if src_type not in ("file", "url") or not isinstance(value, str):
        return (f"{where}: recording {rec_id!r} has a {src_type!r} audio source, which is not read here; "
                "only 'file' (and whole-recording 'url') sources are supported")
    whole = whole_recording(recording, start, duration, channel)
    if src_type == "url":
        checked = _hinted(roots.check(value, where))
        if isinstance(checked, Rejected):
            return checked
        if whole:
            return value, None
        return f"{where}: recording {rec_id!r}: segments of 'url' sources are not supported; copy the audio locally"
    resolved = _resolve(value, base, roots, where)
    if isinstance(resolved, Rejected):
        return resolved
    if whole or (isinstance(base, Path) and not os.path.lexists(resolved)):  # the audio stage reads it
        return resolved, None
    path = path_of(resolved)
    src_channels = [int(c) for c in src.get("channels") or [0]]
    return _segment(path, start, duration, [src_channels.index(c) for c in wanted if c in src_channels], where)


def _wanted_channels(recording: dict[str, Any], channel: Any) -> tuple[list[int], list[int]]:
    """(every channel of the recording's sources, the channels the clip asks for)."""
    sources = [s for s in recording.get("sources") or [] if isinstance(s, dict)]
    all_channels = sorted({int(c) for s in sources for c in s.get("channels") or [0]})
    wanted = sorted({int(c) for c in (channel if isinstance(channel, list) else [channel])}) \
        if channel is not None else all_channels
    return all_channels, wanted


def whole_recording(recording: dict[str, Any], start: float, duration: float | None, channel: Any) -> bool:
    """Whether a clip of [start, start+duration) on `channel` is its whole recording: then it points at
    the file (which the shard may cut into segments); otherwise its part is embedded (never cut)."""
    all_channels, wanted = _wanted_channels(recording, channel)
    rec_duration = _float(recording.get("duration"))
    end = start + duration if duration is not None else None
    return (start <= WHOLE_FILE_TOLERANCE_S and set(wanted) >= set(all_channels)
            and (end is None or rec_duration is None or end >= rec_duration - WHOLE_FILE_TOLERANCE_S))


def clip_seconds(root: CorpusPath) -> Iterator[tuple[str, float]]:
    """(locator, seconds) of each clip that is a whole recording, from the manifests' `duration`s
    (one sequential read of each, no audio opened): what planning weighs. A clip of part of a
    recording is embedded and never cut, so it is left out (one unit)."""
    for unit in manifest_units(root):
        main = _rel(unit.main, root)
        by_id: dict[str, tuple[int, dict[str, Any]]] = {}  # recording id → (offset, duration and channels)
        for offset, line in iter_lines(unit.main):
            record = _parse(line, "")
            if not isinstance(record, dict):
                continue
            try:
                if unit.kind == "cuts":
                    rec = record.get("recording")
                    start, length = float(record.get("start") or 0.0), _float(record.get("duration"))
                    if isinstance(rec, dict) and whole_recording(rec, start, length, record.get("channel")):
                        yield f"{offset}@{main}", length or _float(rec.get("duration")) or 0.0
                elif unit.supervisions is None:
                    yield f"{offset}@{main}", _float(record.get("duration")) or 0.0
                else:
                    by_id.setdefault(_record_id(record, ""), (offset, {  # the first, as iter_lhotse_refs
                        "duration": record.get("duration"),
                        "sources": [{"channels": s.get("channels")} for s in record.get("sources") or []
                                    if isinstance(s, dict)]}))
            except (TypeError, ValueError):
                continue  # a malformed row: its load reports it
        if unit.supervisions is None or not by_id:
            continue
        sup = _rel(unit.supervisions, root)
        for offset, line in iter_lines(unit.supervisions):
            record = _parse(line, "")
            if not isinstance(record, dict) or str(record.get("recording_id", "")) not in by_id:
                continue
            rec_off, rec = by_id[str(record.get("recording_id", ""))]
            try:
                start, length = float(record.get("start") or 0.0), _float(record.get("duration"))
                if whole_recording(rec, start, length, record.get("channel")):
                    yield f"{offset}@{sup}|{rec_off}@{main}", length or _float(rec.get("duration")) or 0.0
            except (TypeError, ValueError):
                continue


def _segment(path: CorpusPath, start: float, duration: float | None, channels: list[int],
             where: str) -> tuple[str, bytes] | str | Rejected:
    """Cut [start, start+duration) (and the wanted channels) out of a file as FLAC bytes; only a
    regular file is opened (a FIFO or device is `not_a_file`, see `tasks.audio.open_regular`); an
    s3:// recording is read by range requests."""
    try:
        handle = open_source(path) if not isinstance(path, Path) else open_regular(path, f"{where}: {path}", None)[0]
    except QuarantineError as exc:
        return Rejected(exc.reason, exc.message)
    except SourceError as exc:
        missing = "no such object" in str(exc)
        return Rejected(ReasonCode.missing_file if missing else ReasonCode.storage_error, f"{where}: {exc}")
    try:
        with handle, sf.SoundFile(handle) as f:
            sr = f.samplerate
            first = max(0, round(start * sr))
            total = f.frames if 0 < f.frames < 2**62 else None  # a piped FLAC states no length
            if duration is not None:
                frames = round(duration * sr)
            elif total is not None:
                frames = total - first
            else:
                return f"{where}: {path} states no length in its header; re-encode it (e.g. `sox in.flac out.flac`)"
            if first > 0:
                f.seek(first)
            samples = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
        return f"{where}: cannot read the segment from {path} ({exc})"
    if channels and samples.shape[1] > 1:
        samples = samples[:, [c for c in channels if c < samples.shape[1]] or [0]]
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sr, format="FLAC", subtype="PCM_24")
    end = start + samples.shape[0] / sr
    return f"{path}#t={start:.3f},{end:.3f}", buf.getvalue()


def prepare_lhotse(path: str | Path, dataset: str = "lhotse", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_lhotse_refs, load_lhotse_clip, Path(path), dataset, allowed_roots)
