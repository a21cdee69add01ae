"""What every trainer export shares: stream a version's rows, write each clip's audio, write a JSONL.

```
DEST/<jsonl name>                         one line per row, written by a format (desta, desta2)
DEST/audio/<clip id as a relative path>.<ext>
```
The audio file is the row's own stored bytes (exactly the clip, never the source recording it
may be a slice of), at a path derived from the clip id alone, so every format, and every re-run,
puts the same clip at the same place: two formats can share one DEST.

Resumable: an audio file already in DEST with exactly the row's bytes is kept (counted as
skipped), anything else is rewritten through `<file>.part` + rename. The JSONL is rewritten from
the start on every run (it is small next to the audio) into `<name>.part` and renamed only when
complete, so a DEST whose JSONL exists holds every audio file it names.

Shards stream one batch at a time through pyarrow over the store's filesystem: memory holds one
batch of audio, never the version. A shard whose audio is stored once, in an audio file
(storage/audio_files.py), gets each batch's bytes joined from it by id, so the clips are the same. A row that cannot be exported stops the export with an
`ExportError` naming the clip id and the shard.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import pyarrow.parquet as pq
import soundfile as sf
from pydantic import BaseModel

from schemas.manifest import Manifest, ShardInfo
from storage.audio_files import AUDIO, ID, AudioLookup, AudioLookupError, fill_audio
from storage.objectstore import ObjectStore
from storage.versions import file_key, read_manifest

log = logging.getLogger(__name__)

AUDIO_DIR = "audio"
BASE_COLUMNS = (ID, AUDIO)  # `id` also joins the audio bytes of a shard that keeps them in an audio file
BATCH_ROWS = 64
_SAFE = "-_.~+=,@"
_KNOWN_EXT = {"flac", "wav", "ogg", "mp3", "opus", "m4a", "webm"}


class ExportError(RuntimeError):
    """A shard or a row could not be exported (the message names it)."""


class RowError(ValueError):
    """Raised by a format for one row; the export adds the clip id and the shard."""


@dataclass(frozen=True)
class AudioFile:
    """The clip's audio as written under DEST: its relative path and what its header says."""

    path: str  # relative to DEST, '/'-separated
    num_bytes: int
    frames: int
    sampling_rate: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sampling_rate


class ExportFormat(Protocol):
    """One trainer's JSONL layout (see storage/export/desta25.py and desta2.py)."""

    name: str
    columns: tuple[str, ...]  # row columns `record` reads, besides id and audio

    def jsonl_name(self, dataset: str) -> str: ...

    def record(self, row: dict[str, Any], audio: AudioFile) -> dict[str, Any]:
        """One JSONL object; raise RowError for a row this format cannot express."""
        ...


class ExportReport(BaseModel):
    dataset: str
    version: str
    format: str
    dest: str
    jsonl: str  # path relative to dest
    rows: int = 0
    audio_files: int = 0  # = rows: one file per row
    audio_bytes: int = 0  # of all audio files the JSONL names
    audio_written: int = 0
    audio_skipped: int = 0  # already in DEST with the row's exact bytes (a resumed export)
    bytes_written: int = 0  # audio bytes written by this run
    jsonl_bytes: int = 0


def audio_extension(data: bytes, path: str | None) -> str:
    """File extension for stored audio bytes: sniffed from the content, else from the original name."""
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] in (b"RIFF", b"RIFX") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "mp3"
    suffix = (path or "").rsplit(".", 1)[-1].lower() if "." in (path or "") else ""
    return suffix if suffix in _KNOWN_EXT else "bin"


def relative_audio_path(clip_id: str, ext: str) -> str:
    """'sample/arctic_a0001' → 'audio/sample/arctic_a0001.flac'. Each '/'-part is percent-quoted
    (injective, so distinct ids never share a file) and can never climb out of DEST."""
    parts = []
    for part in clip_id.split("/"):
        if part in ("", ".", ".."):
            part = quote(part, safe="").replace(".", "%2E") or "%00"
        else:
            part = quote(part, safe=_SAFE)
        parts.append(part)
    return "/".join([AUDIO_DIR, *parts]) + f".{ext}"


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except FileNotFoundError:
        return False


def write_audio(target: Path, data: bytes) -> bool:
    """Put `data` at `target` unless it is already there byte for byte; True if written.

    No fsync: a file cut short by a crash differs from the row's bytes, so the next run rewrites it.
    """
    tmp = target.with_name(target.name + ".part")
    if _same_bytes(target, data):
        tmp.unlink(missing_ok=True)  # a temporary file a crash left behind
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return True


def _probe(data: bytes) -> tuple[int, int]:
    """(frames, sampling rate) from the audio header; RowError if the bytes are not readable audio."""
    try:
        info = sf.info(io.BytesIO(data))
    except (RuntimeError, TypeError, ValueError) as exc:  # soundfile: LibsndfileError is a RuntimeError
        raise RowError(f"stored audio is not readable ({exc})") from None
    if info.samplerate <= 0 or info.frames <= 0:
        raise RowError(f"stored audio has no samples ({info.frames} frames at {info.samplerate} Hz)")
    return int(info.frames), int(info.samplerate)


def _iter_rows(store: ObjectStore, dataset: str, version: str, manifest: Manifest, columns: list[str]
               ) -> Iterator[tuple[str, Iterator[dict[str, Any]]]]:
    """(shard path, its rows) for each shard in manifest order; checks each shard's row count."""
    fs, base = store.arrow_fs()

    def rows_of(shard: ShardInfo) -> Iterator[dict[str, Any]]:
        seen = 0
        lookup = None
        if shard.audio is not None and AUDIO in columns:  # audio stored once: join its bytes by id
            key = file_key(manifest, shard.audio)
            lookup = AudioLookup(fs, f"{base}/{key}", store.uri(key))
        try:
            with fs.open_input_file(f"{base}/{file_key(manifest, shard)}") as fh, \
                    lookup or contextlib.nullcontext():
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                    if lookup is not None:
                        batch = fill_audio(batch, lookup)
                    for row in batch.to_pylist():
                        seen += 1
                        yield row
        except AudioLookupError as exc:
            raise ExportError(f"shard {shard.path}: {exc}") from None
        except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid is a ValueError, IO errors OSError
            raise ExportError(f"shard {shard.path} could not be read: {exc}") from None
        if seen != shard.rows:
            raise ExportError(f"shard {shard.path} has {seen} rows, the manifest says {shard.rows}")

    for shard in manifest.shards:
        yield shard.path, rows_of(shard)


def export_version(store: ObjectStore, dataset: str, version: str, dest: Path, fmt: ExportFormat, *,
                   jsonl_name: str | None = None, progress: bool = False) -> ExportReport:
    """Write `fmt`'s JSONL and every row's audio under `dest` for a committed version."""
    dest = Path(dest)
    name = jsonl_name or fmt.jsonl_name(dataset)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"JSONL name {name!r} must be a plain file name inside DEST")
    manifest = read_manifest(store, dataset, version)
    report = ExportReport(dataset=dataset, version=version, format=fmt.name, dest=str(dest), jsonl=name)
    columns = list(dict.fromkeys([*BASE_COLUMNS, *fmt.columns]))
    dest.mkdir(parents=True, exist_ok=True)
    jsonl = dest / name
    part = jsonl.with_name(name + ".part")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.rows for s in manifest.shards), unit="row", desc=f"{dataset}@{version} {fmt.name}",
                   dynamic_ncols=True)
    try:
        with open(part, "w", encoding="utf-8") as out:
            for shard_path, rows in _iter_rows(store, dataset, version, manifest, columns):
                for row in rows:
                    try:
                        line = _export_row(row, dest, fmt, report)
                    except RowError as exc:
                        raise ExportError(f"row {row.get('id')!r} in shard {shard_path}: {exc}") from None
                    out.write(line)
                    if bar is not None:
                        bar.update(1)
            out.flush()
            os.fsync(out.fileno())
            report.jsonl_bytes = out.tell()
        os.replace(part, jsonl)
    finally:
        if bar is not None:
            bar.close()
        part.unlink(missing_ok=True)
    log.info("exported %s %s (%s) to %s: %d rows, %d audio files written, %d already there", dataset, version,
             fmt.name, dest, report.rows, report.audio_written, report.audio_skipped)
    return report


def _export_row(row: dict[str, Any], dest: Path, fmt: ExportFormat, report: ExportReport) -> str:
    audio = row.get("audio") or {}
    data = audio.get("bytes")
    if not data:
        raise RowError("the row has no stored audio bytes (neither its `audio.bytes` nor the shard's audio "
                       "file holds them; re-run the pipeline for this dataset to get a version that does)")
    frames, rate = _probe(data)
    rel = relative_audio_path(row["id"], audio_extension(data, audio.get("path")))
    record = fmt.record(row, AudioFile(path=rel, num_bytes=len(data), frames=frames, sampling_rate=rate))
    line = json.dumps(record, ensure_ascii=False) + "\n"
    if write_audio(dest.joinpath(*rel.split("/")), data):
        report.audio_written += 1
        report.bytes_written += len(data)
    else:
        report.audio_skipped += 1
    report.rows += 1
    report.audio_files += 1
    report.audio_bytes += len(data)
    return line
