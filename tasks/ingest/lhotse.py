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

Random access: each row is found again by its byte offset in the uncompressed stream. A `.jsonl.gz`
is decompressed once per machine into a cache file (`$TMPDIR/speechpairs-lhotse/`, keyed by path,
mtime and size; an s3:// one by URI, ETag and size) the first time a shard loads from it.

On s3:// (a manifest URI or a prefix of them): manifests are streamed by range requests, a row is
re-read by one range request (plain .jsonl), relative audio paths resolve against the manifest's
own folder, and a segment is cut from its recording by range reads (never a whole-corpus copy).

Each row becomes a Clip in tasks/ingest/lhotse_clips.py (which supervisions speak for a cut, its
labels, where its audio is); this module finds the rows: manifests, ids, offsets, durations.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from schemas.records import Clip, ReasonCode
from tasks.ingest.common import (
    ClipRef,
    CorpusPath,
    SourceError,
    make_id,
    parse_json_object,
    path_of,
    read_line,
    too_long_line,
)
from tasks.ingest.files import FileKey, folder_names, metadata_key, open_source
from tasks.ingest.lhotse_clips import as_float, cut_clip, make_clip, whole_recording
from tasks.ingest.paths import Roots, prepare

MANIFEST_ENDINGS = (".jsonl.gz", ".jsonl")
KINDS = ("cuts", "supervisions", "recordings")
MAX_LINE_BYTES = 64 * 1024 * 1024  # one cut (a long recording's cut may list thousands of supervisions)


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
        return cut_clip(record, base, where, clip_id, dataset, language, extra_labels, bad, roots)
    if not second:  # a recording without supervisions: the whole recording
        return make_clip(record, [], 0.0, None, None, {}, base, where, clip_id, dataset, language, extra_labels,
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
    duration = as_float(record.get("duration"))
    sup = dict(record, start=0.0)  # relative to the clip, like a cut's supervisions
    return make_clip(recording, [sup], start, duration, record.get("channel"), {}, base, where, clip_id,
                     dataset, language, extra_labels, bad, roots)


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
                    start, length = float(record.get("start") or 0.0), as_float(record.get("duration"))
                    if isinstance(rec, dict) and whole_recording(rec, start, length, record.get("channel")):
                        yield f"{offset}@{main}", length or as_float(rec.get("duration")) or 0.0
                elif unit.supervisions is None:
                    yield f"{offset}@{main}", as_float(record.get("duration")) or 0.0
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
                start, length = float(record.get("start") or 0.0), as_float(record.get("duration"))
                if whole_recording(rec, start, length, record.get("channel")):
                    yield f"{offset}@{sup}|{rec_off}@{main}", length or as_float(rec.get("duration")) or 0.0
            except (TypeError, ValueError):
                continue



def prepare_lhotse(path: str | Path, dataset: str = "lhotse", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_lhotse_refs, load_lhotse_clip, Path(path), dataset, allowed_roots)
