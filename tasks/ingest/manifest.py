"""JSONL / CSV / TSV manifests: one clip per row, read lazily with byte offsets.

Columns: `path` (or `audio` / `audio_filepath`), optional `id`, `transcript` (or `text`), optional
`language`; every other column becomes a corpus label, verbatim. Relative paths resolve against
the manifest's folder. Each row is located by its byte offset so a shard can re-read just its rows
without the manifest ever being held in memory.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.records import Clip, ReasonCode
from tasks.ingest.common import ClipRef, clean_label_value, parse_json_object, resolve_audio_uri

PATH_COLUMNS = ("path", "audio", "audio_filepath")
TRANSCRIPT_COLUMNS = ("transcript", "text")
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def manifest_format(path: Path) -> str:
    try:
        return MANIFEST_SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"{path}: unknown manifest type {path.suffix!r}; use one of {sorted(MANIFEST_SUFFIXES)}"
        ) from None


def _csv_header(f: io.BufferedReader, delimiter: str) -> list[str]:
    line = f.readline().decode("utf-8-sig")
    header = next(csv.reader([line], delimiter=delimiter), [])
    return [h.strip() for h in header]


def _lines(f: io.BufferedReader) -> Iterator[str]:
    while line := f.readline():
        yield line.decode("utf-8")


def iter_manifest_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(byte offset, record) for each row; a record that cannot be parsed comes back as its error text."""
    fmt = manifest_format(path)
    with path.open("rb") as f:
        if fmt == "jsonl":
            while True:
                offset = f.tell()
                line = f.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                yield offset, _parse_json_line(line, path, offset)
        delimiter = "\t" if fmt == "tsv" else ","
        header = _csv_header(f, delimiter)
        reader = csv.reader(_lines(f), delimiter=delimiter)
        while True:
            offset = f.tell()
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield offset, f"{path} at byte {offset}: bad CSV row ({exc})"
                continue
            if not any(v.strip() for v in values):
                continue
            yield offset, _zip_row(header, values, path, offset)


def _parse_json_line(line: bytes, path: Path, offset: int) -> dict[str, Any] | str:
    return parse_json_object(line, f"{path} at byte {offset}", "; fix or remove the line")


def _zip_row(header: list[str], values: list[str], path: Path, offset: int) -> dict[str, Any] | str:
    if len(values) != len(header):
        return (f"{path} at byte {offset}: row has {len(values)} fields, header has {len(header)}; "
                "quote fields that contain the delimiter")
    return dict(zip(header, values, strict=True))


def read_record_at(path: Path, offset: int) -> dict[str, Any] | str:
    """Re-read the single row starting at `offset` (as found by `iter_manifest_records`)."""
    fmt = manifest_format(path)
    with path.open("rb") as f:
        if fmt == "jsonl":
            f.seek(offset)
            return _parse_json_line(f.readline(), path, offset)
        delimiter = "\t" if fmt == "tsv" else ","
        header = _csv_header(f, delimiter)
        f.seek(offset)
        try:
            values = next(csv.reader(_lines(f), delimiter=delimiter))
        except (StopIteration, csv.Error) as exc:
            return f"{path} at byte {offset}: bad CSV row ({exc})"
        return _zip_row(header, values, path, offset)


def _first(record: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in record and record[key] not in (None, ""):
            return key, record[key]
    return None, None


def local_id(record: dict[str, Any] | str, offset: int) -> str:
    """The clip id within its corpus: the `id` column, else the audio path without extension."""
    if isinstance(record, dict):
        if record.get("id") not in (None, ""):
            return str(record["id"]).strip()
        _, audio = _first(record, PATH_COLUMNS)
        if isinstance(audio, str) and audio.strip():
            # String ops, not pathlib: pathlib interns every path part, which grows with the manifest.
            return posixpath.splitext(posixpath.normpath(audio.strip().replace("\\", "/")))[0]
    return f"row@{offset}"


def iter_manifest_refs(path: Path, source_index: int, dataset: str) -> Iterator[ClipRef]:
    for offset, record in iter_manifest_records(path):
        yield ClipRef(id=f"{dataset}/{local_id(record, offset)}", source=source_index, locator=str(offset))


def record_to_clip(record: dict[str, Any] | str, *, clip_id: str, dataset: str, base: Path,
                   language: str | None, extra_labels: dict[str, str], where: str) -> Clip:
    """One manifest row → Clip; a row without usable audio path becomes a Clip with an ingest error."""
    if isinstance(record, str):
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, record))
    key, audio = _first(record, PATH_COLUMNS)
    if not isinstance(audio, str) or not audio.strip():
        msg = (f"{where}: no audio path; add a `path` column (or `audio` / `audio_filepath`) "
               f"with a file path relative to the manifest")
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, msg))
    tkey, transcript = _first(record, TRANSCRIPT_COLUMNS)
    lang = record.get("language") or language
    skip = {"id", "language", key, tkey}
    labels = dict(extra_labels)
    labels.update({str(k): clean_label_value(v) for k, v in record.items() if k not in skip and v not in (None, "")})
    return Clip(
        id=clip_id,
        dataset=dataset,
        audio_uri=resolve_audio_uri(audio.strip(), base),
        transcript=" ".join(str(transcript).split()) if transcript is not None else None,
        language=str(lang) if lang else None,
        labels=labels,
    )
