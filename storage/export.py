"""Export a version in the DeSTA2.5 trainer layout: a JSONL file plus the audio files.

```
DEST/<dataset>.jsonl
DEST/audio/<clip id as a relative path>.<ext>
```
Each JSONL line keeps the released DeSTA2.5 fields (`id` = the relative audio path, `dataset`,
`seed_description`, `prompt`, `response`, `messages`); `messages` is what the trainer consumes:
a user turn `"<|AUDIO|>\\n<instruction>"` carrying `audios: [{"audio": <relative path>, "text":
<transcript or "">}]`, then the assistant turn with the response. Paths are relative to DEST, the
trainer's data root. `clip_id` keeps our row id for joins.

Shards stream one row group batch at a time through pyarrow over the store's filesystem, so
memory holds one batch of audio, never the version. The JSONL appears under its name only when
complete (written as `.part`, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.parquet as pq
from pydantic import BaseModel

from storage.objectstore import ObjectStore
from storage.versions import read_manifest, version_prefix

log = logging.getLogger(__name__)

AUDIO_MARKER = "<|AUDIO|>"
AUDIO_DIR = "audio"
COLUMNS = ["id", "dataset", "audio", "transcript", "seed_description", "prompt", "response"]
BATCH_ROWS = 64
_SAFE = "-_.~+=,@"
_KNOWN_EXT = {"flac", "wav", "ogg", "mp3", "opus", "m4a", "webm"}


class ExportError(RuntimeError):
    """A shard could not be exported (the message names it)."""


class ExportReport(BaseModel):
    dataset: str
    version: str
    dest: str
    jsonl: str  # path relative to dest
    rows: int = 0
    audio_files: int = 0
    audio_bytes: int = 0
    skipped_no_audio: int = 0


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


def desta_record(row: dict[str, Any], audio_path: str) -> dict[str, Any]:
    """One JSONL line in the DeSTA2.5 trainer layout."""
    prompt = row.get("prompt") or ""
    response = row.get("response") or ""
    return {
        "id": audio_path,
        "dataset": row.get("dataset"),
        "seed_description": row.get("seed_description"),
        "prompt": prompt,
        "response": response,
        "messages": [
            {"role": "user", "content": f"{AUDIO_MARKER}\n{prompt}",
             "audios": [{"audio": audio_path, "text": row.get("transcript") or ""}]},
            {"role": "assistant", "content": response},
        ],
        "clip_id": row["id"],
    }


def export_desta(store: ObjectStore, dataset: str, version: str, dest: Path) -> ExportReport:
    """Write `dest/<dataset>.jsonl` and `dest/audio/…` for a committed version."""
    dest = Path(dest)
    manifest = read_manifest(store, dataset, version)
    fs, base = store.arrow_fs()
    prefix = version_prefix(dataset, version)
    jsonl = dest / f"{dataset}.jsonl"
    report = ExportReport(dataset=dataset, version=version, dest=str(dest), jsonl=jsonl.name)
    dest.mkdir(parents=True, exist_ok=True)
    part = jsonl.with_name(jsonl.name + ".part")
    try:
        with open(part, "w", encoding="utf-8") as out:
            for shard in manifest.shards:
                rows = 0
                try:
                    with fs.open_input_file(f"{base}/{prefix}/{shard.path}") as fh:
                        for batch in pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS, columns=COLUMNS):
                            for row in batch.to_pylist():
                                rows += 1
                                _export_row(row, dest, out, report)
                except OSError as exc:
                    raise ExportError(f"shard {shard.path} could not be read: {exc}") from None
                if rows != shard.rows:
                    raise ExportError(f"shard {shard.path} has {rows} rows, the manifest says {shard.rows}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, jsonl)
    finally:
        part.unlink(missing_ok=True)
    log.info("exported %s %s to %s: %d rows, %d audio files", dataset, version, dest, report.rows,
             report.audio_files)
    return report


def _export_row(row: dict[str, Any], dest: Path, out: Any, report: ExportReport) -> None:
    audio = row.get("audio") or {}
    data = audio.get("bytes")
    if not data:
        report.skipped_no_audio += 1
        log.warning("row %s has no stored audio bytes; not exported", row.get("id"))
        return
    rel = relative_audio_path(row["id"], audio_extension(data, audio.get("path")))
    target = dest.joinpath(*rel.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    out.write(json.dumps(desta_record(row, rel), ensure_ascii=False) + "\n")
    report.rows += 1
    report.audio_files += 1
    report.audio_bytes += len(data)
