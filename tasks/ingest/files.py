"""A source's own files (manifests, metadata, transcripts): opened safely and keyed for caches.

Only regular files are read (a FIFO, a device or a /proc entry in a metadata file's place is
refused before any open), small ones whole and size-capped (`read_small`), manifests seekable,
an s3:// one by range requests (`open_source`); `file_key` / `metadata_key` give the
(path, version, size) key per-file caches use, so an edited file is read again.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import BinaryIO

from storage.sources import SourceReadError, is_remote, open_uri
from storage.sources import read as remote_read
from storage.sources import stat as remote_stat
from tasks.ingest import remote
from tasks.ingest.common import CorpusPath, SourceError
from tasks.ingest.paths import real_path

FileKey = tuple[str, int, int]


def file_key(path: Path) -> FileKey:
    """(path, mtime_ns, size): the key of per-file metadata caches, so an edited file is re-read."""
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def source_key(path: Path | str) -> FileKey:
    """`file_key` of a local file; (uri, crc of its ETag, size) of a remote one."""
    if is_remote(path):
        entry = remote_stat(str(path))
        return (str(path), zlib.crc32(entry.version.encode()), entry.size)
    return file_key(Path(path))


def open_source(path: CorpusPath | str, buffer_size: int = 1 << 20) -> BinaryIO:
    """A local file, or a remote one read by range requests (never downloaded whole): seekable either way."""
    if is_remote(path):
        try:
            return open_uri(str(path), buffer_size=buffer_size)
        except SourceReadError as exc:
            raise SourceError(str(exc)) from None
    return open(str(path), "rb")


def require_file(path: Path, what: str, fix: str) -> Path:
    """`path` if it is a regular file, else a SourceError naming the file, what it is for and the fix.

    A FIFO, a device or a /proc entry in a metadata file's place is refused here, before any
    open (a FIFO would block the run, /dev/zero would never end)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        raise SourceError(f"{path}: missing {what}; {fix}") from None
    if not stat.S_ISREG(st.st_mode) or _pseudo(real_path(str(path))):
        raise SourceError(f"{path}: {what} is not a regular file (a FIFO, device or link to one); {fix}")
    return path


def _pseudo(real: str) -> bool:
    """Whether a real path is on a kernel pseudo filesystem (its files lie about their size)."""
    return real.startswith(("/proc/", "/sys/", "/dev/")) or real in ("/proc", "/sys", "/dev")


def metadata_key(path: CorpusPath, what: str, fix: str) -> FileKey:
    """`file_key` of a metadata file that must exist (a SourceError naming it and the fix otherwise);
    for an s3:// one (uri, crc of its ETag, size), from its folder's listing or a HEAD."""
    if isinstance(path, remote.RemotePath):
        try:
            found = remote.entry(path.uri)
        except SourceReadError as exc:
            raise SourceError(f"{path}: cannot read the {what}: {exc}") from None
        if found is None:
            raise SourceError(f"{path}: missing {what}; {fix}")
        return (path.uri, zlib.crc32(found.version.encode()), found.size)
    try:
        return file_key(require_file(path, what, fix))
    except FileNotFoundError:  # removed between the check and the stat
        raise SourceError(f"{path}: missing {what}; {fix}") from None


MAX_METADATA_BYTES = 512 * 1024 * 1024


def read_small(path: CorpusPath, limit: int = MAX_METADATA_BYTES) -> bytes:
    """Bytes of a small metadata file: a regular file (a FIFO or device is refused, before any
    open) of at most `limit` bytes, else SourceError; a missing file raises FileNotFoundError.
    An s3:// one is one GET, its size checked first (storage/sources.py)."""
    if isinstance(path, remote.RemotePath):
        try:
            return remote_read(path.uri, max_bytes=limit)
        except SourceReadError as exc:
            if exc.problem == "missing":
                raise FileNotFoundError(str(exc)) from None
            if exc.problem == "too_large":
                raise SourceError(f"{path}: metadata file larger than {limit:,} bytes; is it the right file?") from None
            raise SourceError(f"{path}: cannot read the metadata file: {exc}") from None
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) or _pseudo(real_path(str(path))):
        raise SourceError(f"{path}: metadata file is not a regular file (a FIFO, device or link to one); "
                          "replace it with the corpus's file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{path}: metadata file is not a regular file; replace it with the corpus's file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise SourceError(f"{path}: metadata file larger than {limit:,} bytes; is it the right file?")
    return data


def folder_names(folder: CorpusPath) -> list[str]:
    """Sorted names right below a folder: `os.listdir` (OSError as it comes), or an s3:// folder's
    listing (a SourceError naming the URI and the setting when it fails)."""
    if isinstance(folder, remote.RemotePath):
        try:
            return folder.names()
        except SourceReadError as exc:
            raise SourceError(f"{folder}: cannot be listed: {exc}") from None
    return sorted(os.listdir(folder))


def read_text(path: CorpusPath) -> str:
    """Text of a small metadata file (see `read_small`): UTF-8 (BOM tolerated), else GB18030
    (Chinese corpora), lenient."""
    data = read_small(path)
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            return data.decode("gb18030")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")
