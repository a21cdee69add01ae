"""What every source layout shares: the light clip reference used for planning, and path rules."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

# libsndfile reads the first six in-process; the rest (and whatever it cannot open) go through ffmpeg.
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".webm", ".mp4")


class ClipRef(BaseModel):
    """A clip's id and where to find its record again: small enough to plan millions of them."""

    model_config = ConfigDict(frozen=True)

    id: str
    source: int  # index into RunConfig.sources
    locator: str  # byte offset (manifests) or relative path (folders)
    duplicate: bool = False


def resolve_audio_uri(path: str, base: Path) -> str:
    """Relative paths resolve against the manifest's folder; URIs (s3://, file://) stay as given."""
    if "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def clean_label_value(value: Any) -> str:
    """Labels are stored verbatim as strings; numbers and booleans keep their text form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


class SourceError(ValueError):
    """A source that cannot be read at all (missing path, unknown layout): fails the run up front."""


FileKey = tuple[str, int, int]


def file_key(path: Path) -> FileKey:
    """(path, mtime_ns, size): the key of per-file metadata caches, so an edited file is re-read."""
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def require_file(path: Path, what: str, fix: str) -> Path:
    """`path` if it is a file, else a SourceError naming the file, what it is for and how to fix it."""
    if not path.is_file():
        raise SourceError(f"{path}: missing {what}; {fix}")
    return path


def metadata_key(path: Path, what: str, fix: str) -> FileKey:
    """`file_key` of a metadata file that must exist (a SourceError naming it and the fix otherwise)."""
    try:
        return file_key(require_file(path, what, fix))
    except FileNotFoundError:  # removed between the check and the stat
        raise SourceError(f"{path}: missing {what}; {fix}") from None


def iter_files(root: Path, match: Callable[[str], bool]) -> Iterator[str]:
    """Relative posix paths of files whose name matches, depth-first in sorted order, lazily."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if not name.startswith(".") and match(name):
                yield (rel_dir / name).as_posix()


def read_text(path: Path) -> str:
    """Text of a small metadata file: UTF-8 (BOM tolerated), else GB18030 (Chinese corpora), lenient."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            return data.decode("gb18030")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")


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


def prepare(iter_refs: Callable[[Any, int, str], Iterator[ClipRef]], load: Callable[..., Any], root: Any,
            dataset: str) -> Iterator[Any]:
    """lhotse-style `prepare_<corpus>(path)`: every clip of one corpus, lazily, outside a run."""
    for ref in iter_refs(root, 0, dataset):
        yield load(root, ref.locator, clip_id=ref.id, dataset=dataset, language=None, extra_labels={})


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
