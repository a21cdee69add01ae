"""What every source layout shares about a clip: the light reference planning carries, its id,
problem refs, labels, and the rows of a manifest.

Hostile input handled here once for every adapter: clip ids lose their control characters
(`clean_id`), manifest lines are read with a length cap (`read_line`), and a row that is not
UTF-8 or not a JSON object gets a message naming the fix (`json_object`). Where a source may read
is tasks/ingest/paths.py; opening its own metadata files, tasks/ingest/files.py.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict

from schemas.records import ReasonCode
from storage.sources import is_remote
from storage.sources import join as join_uri
from tasks.ingest import remote

CorpusPath = Path | remote.RemotePath  # what a corpus adapter walks and reads: a local path, or an s3:// one


def path_of(text: str) -> CorpusPath:
    """A `RemotePath` for an s3:// URI, else a `Path` (metadata caches keep paths as text)."""
    return remote.RemotePath(text) if text.startswith("s3://") else Path(text)

# libsndfile reads the first six in-process; the rest (and whatever it cannot open) go through ffmpeg.
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".webm", ".mp4")


class ClipRef(BaseModel):
    """A clip's id and where to find its record again: small enough to plan millions of them."""

    model_config = ConfigDict(frozen=True)

    id: str
    source: int  # index into RunConfig.sources
    locator: str  # byte offset (manifests) or relative path (folders)
    duplicate: bool = False


def resolve_audio_uri(path: str, base: Path | str) -> str:
    """Relative paths join the manifest's folder (absolute, not yet resolved: `Roots.check` does
    that, so it can see a dangling link); URIs (s3://, file://) stay as given. A remote manifest's
    folder (`base` an s3:// or http(s):// URI) joins its relative paths as URIs."""
    if "://" in path or "\0" in path:
        return path
    if is_remote(base):
        return path if path.startswith("/") else join_uri(str(base), path.replace("\\", "/"))
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


# ---------------------------------------------------------------- clip ids

_HEX = set("0123456789abcdefABCDEF")


def _needs_escape(ch: str) -> bool:
    # Cc: C0 controls, DEL, C1 controls; Cs: lone surrogates (a non-UTF-8 file name, decoded by Python with
    # surrogateescape, cannot be written as UTF-8); Zl/Zp: U+2028/2029, line ends to splitlines() and JS.
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")


def clean_id(text: str) -> str:
    """`text` with control characters percent-encoded (UTF-8 bytes, `\n` → `%0A`), stable and injective.

    A `%` that is already followed by two hex digits becomes `%25`, so a file literally named
    `a%0Ab` and one named `a<newline>b` keep distinct ids; every other `%` and character stays.
    """
    if text.isprintable() and "%" not in text:
        return text  # the common case: nothing to do
    out: list[str] = []
    for i, ch in enumerate(text):
        if _needs_escape(ch):
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        elif ch == "%" and text[i + 1:i + 2] in _HEX and text[i + 2:i + 3] in _HEX:
            out.append("%25")
        else:
            out.append(ch)
    return "".join(out)


def make_id(dataset: str, local: str) -> str:
    """`<dataset>/<local id>`, cleaned: the one way every adapter makes a clip id."""
    return clean_id(f"{dataset}/{local}")



# ---------------------------------------------------------------- problem refs (folders not entered)

PROBLEM = "\0"  # a locator starting with NUL: no file path can, so it marks a problem ref


def problem_ref(dataset: str, rel: str, source_index: int, reason: ReasonCode, message: str,
                folder: bool = True) -> ClipRef:
    """A quarantine-to-be for what a walk could not enter: id `<dataset>/<relative dir>/` (a file:
    `<dataset>/<relative path without extension>`). The reason and message travel in the locator,
    so every consumer of refs (plans, calibration) keeps them."""
    rel = rel.strip("/")
    local = (f"{rel}/" if rel else "") if folder else rel.rsplit(".", 1)[0]
    shown = clean_id(rel)  # the locator is JSON: it must encode as UTF-8 (the rel is shown, never opened)
    return ClipRef(id=make_id(dataset, local), source=source_index,
                   locator=PROBLEM.join(("", reason.value, shown, message)))


def ref_problem(locator: str) -> tuple[ReasonCode, str, str] | None:
    """(reason, relative dir, message) of a problem ref's locator; None for an ordinary locator."""
    if not locator.startswith(PROBLEM):
        return None
    _, reason, rel, message = locator.split(PROBLEM, 3)
    return ReasonCode(reason), rel, message


def clean_label_value(value: Any) -> str:
    """Labels are stored verbatim as strings; numbers and booleans keep their text form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


class SourceError(ValueError):
    """A source that cannot be read at all (missing path, unknown layout): fails the run up front."""


# ---------------------------------------------------------------- capped lines

MAX_LINE_BYTES = 4 * 1024 * 1024  # one manifest row: a clip's path, text and labels


def read_line(f: BinaryIO, limit: int = MAX_LINE_BYTES) -> tuple[bytes, int]:
    """(line, its length in bytes) holding at most `limit` bytes in memory: a longer line is
    consumed to its end and comes back as b"" with its true length, so the caller can report it."""
    raw = f.readline(limit + 1)
    if len(raw) <= limit or raw.endswith(b"\n"):
        return raw, len(raw)
    size = len(raw)
    while chunk := f.readline(1 << 20):
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"", size


def too_long_line(size: int | None, limit: int = MAX_LINE_BYTES) -> str:
    """Why an over-long line is not read (`size` None when only the cap is known)."""
    told = f"line of {size:,} bytes" if size is not None else "line"
    return (f"{told} is longer than the {limit:,} bytes a row may have (not read); a row holds one clip's "
            "path, text and labels: fix or remove the line")


def one_line(text: str | None) -> str | None:
    """Whitespace collapsed to single spaces; None for empty text."""
    if text is None:
        return None
    return " ".join(text.split()) or None


def label_dict(extra: dict[str, str], pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Source labels first, then the corpus's own (which win); empty values are left out."""
    labels = dict(extra)
    for key, value in pairs:
        if value is None:
            continue
        text = clean_label_value(value)
        if text:
            labels[key] = text
    return labels


def not_utf8(exc: UnicodeDecodeError, what: str = "manifest") -> str:
    """Why a line is not UTF-8 and how to fix it, without the codec's repr-laden wording."""
    byte = exc.object[exc.start:exc.start + 1].hex()
    return (f"not valid UTF-8 (byte 0x{byte} at column {exc.start + 1}); save the {what} as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8`")


def json_object(line: bytes | str) -> dict[str, Any] | str:
    """One JSONL line → its object, or what is wrong with it (no location: the caller adds that)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return not_utf8(exc)
    try:
        record = json.loads(line.removeprefix("\ufeff"))  # a UTF-8 BOM on the first line is allowed
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return f"each line must be a JSON object, got {type(record).__name__}"
    return record


def parse_json_object(line: bytes | str, where: str, fix: str = "") -> dict[str, Any] | str:
    """One JSONL line → its object, or an error text naming `where` (then `fix`, if given)."""
    record = json_object(line)
    if isinstance(record, str):
        return f"{where}: {record}{fix if record.startswith('not valid JSON') else ''}"
    return record
