"""JSONL / CSV / TSV manifests: one clip per row, read lazily with byte offsets.

Columns: `path` (or `audio` / `audio_filepath`), optional `id`, `transcript` (or `text`), optional
`language`; every other column becomes a corpus label, verbatim. Relative paths resolve against
the manifest's folder. Each row is located by its byte offset so a shard can re-read just its rows
without the manifest ever being held in memory.

Text is UTF-8 (a BOM and CRLF line ends are fine). A row that is not UTF-8, not JSON, longer than
MAX_LINE_BYTES or has the wrong number of fields comes back as an error text naming the file, line
and byte offset, which becomes that clip's `bad_row` quarantine while the other rows go on. Audio
paths must lead below the manifest's folder or `sources[N].allowed_roots` (`path_outside_root`
otherwise); a NUL byte in a path is a `bad_row`.
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from schemas.records import Clip, ReasonCode
from tasks.ingest.common import (
    ClipRef,
    SourceError,
    clean_label_value,
    json_object,
    make_id,
    not_utf8,
    read_line,
    resolve_audio_uri,
    too_long_line,
)
from tasks.ingest.files import FileKey, open_source, source_key
from tasks.ingest.paths import Rejected, Roots

PATH_COLUMNS = ("path", "audio", "audio_filepath")
TRANSCRIPT_COLUMNS = ("transcript", "text")
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def manifest_format(path: Path | str) -> str:
    suffix = posixpath.splitext(str(path))[1]
    try:
        return MANIFEST_SUFFIXES[suffix.lower()]
    except KeyError:
        raise ValueError(
            f"{path}: unknown manifest type {suffix!r}; use one of {sorted(MANIFEST_SUFFIXES)}"
        ) from None


class _Lines:
    """A binary manifest's physical lines as text, counted; remembers the first that is not UTF-8.

    Decoding line by line (not the whole file) lets one Latin-1 byte spoil only its own row: the
    line is decoded with replacement characters so the CSV parser keeps its place, and the row is
    reported as `bad_row` instead of aborting the run.
    """

    def __init__(self, f: BinaryIO, line: int = 0) -> None:
        self.f = f
        self.line = line  # physical lines consumed so far
        self.bad: UnicodeDecodeError | None = None
        self.too_long: int | None = None  # size of the first line above MAX_LINE_BYTES

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw, size = read_line(self.f)
        if not size:
            raise StopIteration
        self.line += 1
        if not raw:  # longer than MAX_LINE_BYTES: skipped unread; the row is reported
            self.too_long = self.too_long or size
            return "\n"
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.bad = self.bad or exc
            return raw.decode("utf-8", errors="replace")


def _csv_header(f: BinaryIO, delimiter: str, path: Path | str) -> list[str]:
    raw, size = read_line(f)
    if size and not raw:
        raise SourceError(f"{path} line 1 (the header): {too_long_line(size)}")
    try:
        line = raw.decode("utf-8-sig")  # a BOM is dropped from the first column's name
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} line 1 (the header): {not_utf8(exc)}") from None
    header = next(csv.reader([line], delimiter=delimiter), [])
    return [h.strip() for h in header]


def _where(path: Path | str, line: int | None, offset: int) -> str:
    """`<file> line N (byte B)`; a re-read row (line None) counts its line only now that it failed."""
    return f"{path} line {line if line is not None else line_number(path, offset)} (byte {offset})"


def iter_manifest_records(path: Path | str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(byte offset, record) for each row; a record that cannot be parsed comes back as its error text.
    `path` may be an s3:// or http(s):// URI (str): read by range requests, never downloaded whole."""
    fmt = manifest_format(path)
    with open_source(path) as f:
        if fmt == "jsonl":
            line = 0
            while True:
                offset = f.tell()
                raw, size = read_line(f)
                if not size:
                    return
                line += 1
                if not raw:
                    yield offset, f"{_where(path, line, offset)}: {too_long_line(size)}"
                    continue
                if not raw.strip():
                    continue
                yield offset, _json_row(raw, path, line, offset)
        delimiter = "\t" if fmt == "tsv" else ","
        header = _csv_header(f, delimiter, path)
        lines = _Lines(f, line=1)
        reader = csv.reader(lines, delimiter=delimiter)
        while True:
            offset, first, lines.bad, lines.too_long = f.tell(), lines.line + 1, None, None
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield offset, f"{_where(path, first, offset)}: bad CSV row ({exc}); fix or remove the row"
                continue
            if lines.too_long is not None:
                yield offset, f"{_where(path, first, offset)}: {too_long_line(lines.too_long)}"
                continue
            if lines.bad is not None:
                yield offset, f"{_where(path, first, offset)}: {not_utf8(lines.bad)}"
                continue
            if not any(v.strip() for v in values):
                continue
            yield offset, _zip_row(header, values, path, first, offset)


def _json_row(raw: bytes, path: Path | str, line: int | None, offset: int) -> dict[str, Any] | str:
    record = json_object(raw)
    if isinstance(record, str):
        fix = "; fix or remove the line" if record.startswith("not valid JSON") else ""
        return f"{_where(path, line, offset)}: {record}{fix}"
    return record


def _zip_row(header: list[str], values: list[str], path: Path | str, line: int | None, offset: int) -> dict[str, Any] | str:
    if len(values) != len(header):
        return (f"{_where(path, line, offset)}: row has {len(values)} fields, header has {len(header)}; "
                "quote fields that contain the delimiter")
    # CRLF files: the parser drops line ends, but a quoted multi-line value keeps its inner `\r`.
    return dict(zip(header, (v.replace("\r\n", "\n").replace("\r", "\n") for v in values), strict=True))


def read_record_at(path: Path | str, offset: int) -> dict[str, Any] | str:
    """Re-read the single row starting at `offset` (as found by `iter_manifest_records`)."""
    fmt = manifest_format(path)
    with open_source(path, buffer_size=_ROW_BUFFER) as f:
        if fmt == "jsonl":
            f.seek(offset)
            raw, size = read_line(f)
            if size and not raw:
                return f"{_where(path, None, offset)}: {too_long_line(size)}"
            return _json_row(raw, path, None, offset)
        delimiter = "\t" if fmt == "tsv" else ","
        header = _csv_header(f, delimiter, path)
        f.seek(offset)
        lines = _Lines(f)
        try:
            values = next(csv.reader(lines, delimiter=delimiter))
        except StopIteration:
            return f"{_where(path, None, offset)}: no row here; the manifest changed after planning, re-run"
        except csv.Error as exc:
            return f"{_where(path, None, offset)}: bad CSV row ({exc}); fix or remove the row"
        if lines.too_long is not None:
            return f"{_where(path, None, offset)}: {too_long_line(lines.too_long)}"
        if lines.bad is not None:
            return f"{_where(path, None, offset)}: {not_utf8(lines.bad)}"
        return _zip_row(header, values, path, None, offset)


_BLOCK = 1 << 16
_ROW_BUFFER = 1 << 16  # a remote row re-read: one 64 KiB range request for most rows


@lru_cache(maxsize=8)
def _newlines_before_blocks(key: FileKey) -> tuple[int, ...]:
    """Newlines before each 64 KiB block: one pass per file, then a row's line costs one block read."""
    counts = [0]
    with open_source(key[0]) as f:
        while block := f.read(_BLOCK):
            counts.append(counts[-1] + block.count(b"\n"))
    return tuple(counts)


def line_number(path: Path | str, offset: int) -> int:
    """1-based physical line at byte `offset`, for error messages (only bad rows pay for it)."""
    index = _newlines_before_blocks(source_key(path))
    block = min(offset // _BLOCK, len(index) - 1)
    with open_source(path, buffer_size=_ROW_BUFFER) as f:
        f.seek(block * _BLOCK)
        head = f.read(max(0, offset - block * _BLOCK))
    return index[block] + head.count(b"\n") + 1


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


def iter_manifest_refs(path: Path | str, source_index: int, dataset: str) -> Iterator[ClipRef]:
    for offset, record in iter_manifest_records(path):
        yield ClipRef(id=make_id(dataset, local_id(record, offset)), source=source_index, locator=str(offset))


def row_locator(path: Path | str, offset: int) -> Callable[[], str]:
    """`<file> line N (byte B)`, computed only when a row's message needs it."""
    return lambda: _where(path, None, offset)


def record_to_clip(record: dict[str, Any] | str, *, clip_id: str, dataset: str, base: Path | str,
                   language: str | None, extra_labels: dict[str, str], where: str, roots: Roots | None = None,
                   locate: Callable[[], str] | None = None) -> Clip:
    """One manifest row → Clip; a row without usable audio path (or one that leads outside `roots`,
    default: `base`) becomes a Clip with an ingest error, located by `locate()` (default `where`)."""
    if isinstance(record, str):
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, record))
    key, audio = _first(record, PATH_COLUMNS)
    if not isinstance(audio, str) or not audio.strip():
        msg = (f"{where}: no audio path; add a `path` column (or `audio` / `audio_filepath`) "
               f"with a file path relative to the manifest")
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, msg))
    real = (roots or Roots.of(base)).check(resolve_audio_uri(audio.strip(), base), locate or where)
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, where)
    tkey, transcript = _first(record, TRANSCRIPT_COLUMNS)
    timestamps = _timestamps(record.get(TIMESTAMPS_COLUMN), base, roots, locate or where)
    if isinstance(timestamps, Rejected):
        return timestamps.clip(clip_id, dataset, where)
    lang = record.get("language") or language
    skip = {"id", "language", key, tkey, TIMESTAMPS_COLUMN}
    labels = dict(extra_labels)
    labels.update({str(k): clean_label_value(v) for k, v in record.items() if k not in skip and v not in (None, "")})
    return Clip(
        id=clip_id,
        dataset=dataset,
        audio_uri=real,
        transcript=" ".join(str(transcript).split()) if transcript is not None else None,
        language=str(lang) if lang else None,
        labels=labels,
        timestamps_uri=timestamps,
    )


# A row's timestamped transcript (SRT, WebVTT, TextGrid, CTM, lhotse, Whisper JSON), relative to the
# manifest like the audio path: a long recording's segments take their words from it.
TIMESTAMPS_COLUMN = "timestamps"


def _timestamps(value: Any, base: Path | str, roots: Roots | None, where: str | Callable[[], str]
                ) -> str | Rejected | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.strip():
        shown = where() if callable(where) else where
        return Rejected(ReasonCode.bad_row, f"{shown}: `{TIMESTAMPS_COLUMN}` must be the path of a timestamped "
                                            "transcript file (SRT, TextGrid, …) relative to the manifest")
    return (roots or Roots.of(base)).check(resolve_audio_uri(value.strip(), base), where)
