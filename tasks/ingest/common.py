"""What every source layout shares: the light clip reference used for planning, and path rules.

Hostile input is handled here once for every adapter: clip ids lose their control characters
(`clip_id`), audio paths are confined to the source's roots (`Roots.check`), folder walks never
open a file, follow symbolic links only inside the roots, detect loops and report the folders they
cannot enter (`walk`), and manifest lines are read with a length cap (`read_line`).
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict

from schemas.records import Clip, ReasonCode
from storage.sources import SourceReadError, is_remote, open_uri
from storage.sources import join as join_uri
from storage.sources import read as remote_read
from storage.sources import stat as remote_stat
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


# ---------------------------------------------------------------- roots (path confinement)


@dataclass(frozen=True)
class Rejected:
    """Why an audio path is not read: the quarantine reason and message (naming the fix)."""

    reason: ReasonCode
    message: str

    def clip(self, clip_id: str, dataset: str, audio_uri: str) -> Clip:
        return Clip(id=clip_id, dataset=dataset, audio_uri=audio_uri, ingest_error=(self.reason, self.message))


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


@dataclass(frozen=True)
class Roots:
    """Where one source may read: its own root (a manifest's folder, the corpus folder, an s3://
    prefix) plus `sources[N].allowed_roots`. Local entries are real paths (symbolic links and `..`
    resolved), so a path is inside only if its own real path is."""

    paths: tuple[str, ...]
    source: int | None = None  # index in `sources`, for the fix in messages

    @classmethod
    def of(cls, root: str | CorpusPath, allowed: Iterable[str] = (), source: int | None = None) -> Roots:
        """Roots for a source rooted at `root` (a folder, or a file: then its folder)."""
        entries = [str(root), *allowed]
        out: list[str] = []
        for entry in entries:
            if "\0" in entry:
                continue
            if "://" in entry:
                entry = entry.rstrip("/")
                if entry == str(root).rstrip("/") and "." in entry.rsplit("/", 1)[-1]:
                    entry = entry.rsplit("/", 1)[0]  # a file (s3://bucket/data/x.parquet): its folder
                out.append(entry + "/")
                continue
            real = _real(entry)
            if entry == str(root) and not os.path.isdir(real):
                real = os.path.dirname(real)
            out.append(real)
        return cls(tuple(dict.fromkeys(out)), source)

    @property
    def main(self) -> str:
        return self.paths[0] if self.paths else "?"

    @property
    def fix_key(self) -> str:
        return f"sources[{self.source}].allowed_roots" if self.source is not None else "the source's allowed_roots"

    def contains(self, path: str) -> bool:
        """Whether `path` (a real local path, or a URI) lies below one of the roots."""
        if "://" in path:
            norm = _norm_uri(path)
            return any(r.endswith("/") and "://" in r and norm.startswith(r) for r in self.paths)
        for root in self.paths:
            if "://" in root:
                continue
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                return True
        return False

    def outside(self, shown: str, real: str | None = None, named: bool = True) -> Rejected:
        """path_outside_root, naming the path (unless the location already is it), where it leads,
        the root and the fix."""
        target = real or shown
        leads = (f"resolves to {_printable(target)}, which is outside" if real is not None and real != shown
                 else "is outside")
        folder = _printable(posixpath.dirname(target) if "://" not in target else target.rsplit("/", 1)[0])
        subject = f"audio path {_printable(shown)!r} " if named else ""
        return Rejected(ReasonCode.path_outside_root,
                        f"{subject}{leads} the source's root {self.main}; sources may only read below their "
                        f"root: move the file there, or add {folder} to {self.fix_key} in the config if that "
                        "folder is meant to be read")

    def check(self, path: str, locate: str | Callable[[], str] | None = None) -> str | Rejected:
        """The real path (or URI) to read for `path`, or why it must not be read. Stats, never opens.

        `locate` names the row or file in messages (a callable is called only for a rejection);
        without it the message starts with the path itself."""
        rejected = self._check(path, named=locate is not None)
        if isinstance(rejected, str):
            return rejected
        where = (locate() if callable(locate) else locate) or _printable(path)
        return Rejected(rejected.reason, f"{where}: {rejected.message}")

    def _check(self, path: str, named: bool) -> str | Rejected:
        if "\0" in path:
            return Rejected(ReasonCode.bad_row, f"the audio path contains a NUL byte ({_printable(path)!r}); "
                                                "fix the path in the row")
        if not _utf8(path):
            return Rejected(ReasonCode.bad_row, f"the audio path is not valid UTF-8 ({_printable(path)!r}); "
                                                "fix the path in the row")
        if path.startswith("file://"):
            path = path.removeprefix("file://")
        if "://" in path:
            return path if self.contains(path) else self.outside(path, _norm_uri(path), named)
        if not os.path.isabs(path):
            path = os.path.abspath(path)
        try:
            real = _real(path)
        except (OSError, ValueError) as exc:
            return Rejected(ReasonCode.unreadable, f"cannot resolve {_printable(path)!r} ({exc}); fix the path")
        if not self.contains(real):
            return self.outside(path, real, named)
        if os.path.lexists(path) and not os.path.exists(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            subject = f"{_printable(path)} is " if named else ""
            return Rejected(ReasonCode.not_a_file,
                            f"{subject}a dangling symbolic link (to {_printable(target)!r}, which does not exist, "
                            "or a link loop); fix or remove the link")
        return real


def _norm_uri(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{posixpath.normpath(rest)}" if rest else uri


def _printable(text: str) -> str:
    """`text` for a message: a non-UTF-8 byte as `\\xff`, control characters percent-encoded."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        pass
    return clean_id(text)


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
    if not stat.S_ISREG(st.st_mode) or _pseudo(_real(str(path))):
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


@dataclass(frozen=True)
class WalkProblem:
    """What a walk did not enter or cannot name: an unreadable folder, a link loop, a link leading
    outside the roots, a name that is not UTF-8 (it could be neither an id nor an output path)."""

    rel: str  # relative posix path, without a trailing slash
    reason: ReasonCode
    message: str
    folder: bool = True  # False: a single file (its id has no trailing slash)

    def ref(self, dataset: str, source_index: int) -> ClipRef:
        return problem_ref(dataset, self.rel, source_index, self.reason, self.message, self.folder)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a byte name Python decoded with surrogateescape
        return False
    return True


def walk(root: CorpusPath, match: Callable[[str], bool], roots: Roots | None = None) -> Iterator[str | WalkProblem]:
    """Relative posix paths of files whose name matches (hidden ones left out), depth-first in sorted
    order, lazily, and a `WalkProblem` for each folder not entered (and each matching file whose
    name is not UTF-8).

    Only directory entries are read, never a file, so a FIFO or a device cannot block or flood the
    walk (the audio stage refuses them). Symbolic links to folders are followed when their real path
    is inside `roots` (default: `root`); loops are caught by (device, inode) and reported once.
    An s3:// folder is one listing (no links, no unreadable folders there).
    """
    if isinstance(root, remote.RemotePath):
        try:
            yield from (rel for rel in root.walk_files() if match(rel.rsplit("/", 1)[-1]))
        except SourceReadError as exc:
            raise SourceError(f"source {root}: cannot be listed: {exc}") from None
        return
    roots = roots or Roots.of(root)
    try:
        top = os.stat(root)
    except OSError as exc:
        yield WalkProblem("", ReasonCode.unreadable, f"{_printable(str(root))}: cannot enter ({exc.strerror}); "
                                                     "check the path")
        return
    reported: set[tuple[int, int]] = set()
    # (folder path, its relative path, the (dev, inode) of it and its ancestors)
    stack: list[tuple[str, str, tuple[tuple[int, int], ...]]] = [(str(root), "", ((top.st_dev, top.st_ino),))]
    while stack:
        path, rel, ancestors = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield WalkProblem(rel, ReasonCode.unreadable,
                              f"{_printable(path)}: cannot list this folder ({exc.strerror}), so its clips are left "
                              "out; make it readable (chmod a+rx) or remove it")
            continue
        subdirs: list[tuple[str, str, tuple[tuple[int, int], ...]]] = []
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            shown = _printable(entry.path)
            try:
                is_dir = entry.is_dir()  # follows links: a stat, not an open
            except OSError:
                is_dir = False
            if not is_dir:
                if not entry.name.startswith(".") and match(entry.name):
                    yield child if _utf8(entry.name) else WalkProblem(
                        child, ReasonCode.unreadable, f"{shown}: the file name is not valid UTF-8, so it can be "
                        "neither a clip id nor a path in the output; rename it (e.g. `convmv -f latin1 -t utf-8 "
                        "--notest <file>`)", folder=False)
                continue
            if not _utf8(entry.name):
                yield WalkProblem(child, ReasonCode.unreadable,
                                  f"{shown}: the folder name is not valid UTF-8, so its clips are left out; rename "
                                  "it (e.g. `convmv -f latin1 -t utf-8 --notest -r <folder>`)")
                continue
            try:
                st = os.stat(entry.path)
            except OSError as exc:
                yield WalkProblem(child, ReasonCode.unreadable, f"{shown}: cannot enter ({exc.strerror})")
                continue
            key = (st.st_dev, st.st_ino)
            if entry.is_symlink():
                real = _printable(_real(entry.path))
                if not roots.contains(_real(entry.path)):
                    yield WalkProblem(child, ReasonCode.path_outside_root,
                                      f"{shown}: a link to the folder {real}, outside the source's root "
                                      f"{roots.main}; its clips are left out: add {real} to {roots.fix_key} "
                                      "to read it, or remove the link")
                    continue
            if key in ancestors:
                link_key = _lstat_key(entry.path)
                if link_key not in reported:
                    reported.add(link_key)
                    yield WalkProblem(child, ReasonCode.unreadable,
                                      f"{shown}: a symbolic-link loop (it leads back to "
                                      f"{_printable(_real(entry.path))}, a folder above it); not followed: "
                                      "remove the link")
                continue
            subdirs.append((entry.path, child, (*ancestors, key)))
        stack.extend(reversed(subdirs))


def _lstat_key(path: str) -> tuple[int, int]:
    try:
        st = os.lstat(path)
    except OSError:
        return (-1, hash(path))
    return (st.st_dev, st.st_ino)


def stat_key(path: CorpusPath) -> str:
    """`size\x1fmtime_ns` of what `path` leads to, for fingerprints; never opens, never raises (a
    dangling link or a loop gives its own marker). An s3:// object: `size\x1fETag`, looked up now."""
    if isinstance(path, remote.RemotePath):
        try:
            found = remote.fresh_entry(path.uri)
        except SourceReadError as exc:
            raise SourceError(f"source {path}: {exc}") from None
        return "missing" if found is None else f"{found.size}\x1f{found.version}"
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        try:
            st = os.lstat(path)
        except (OSError, ValueError):
            return "missing"
        return f"link\x1f{st.st_mtime_ns}"
    kind = "" if stat.S_ISREG(st.st_mode) else f"\x1fmode={stat.S_IFMT(st.st_mode):o}"
    return f"{st.st_size}\x1f{st.st_mtime_ns}{kind}"


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
    if not stat.S_ISREG(st.st_mode) or _pseudo(_real(str(path))):
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


def prepare(iter_refs: Callable[..., Iterator[ClipRef]], load: Callable[..., Any], root: Any,
            dataset: str, allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """lhotse-style `prepare_<corpus>(path)`: every clip of one corpus, lazily, outside a run; audio
    only below `root` and `allowed_roots` (others come back with `path_outside_root`)."""
    roots = Roots.of(root, allowed_roots)
    for ref in iter_refs(root, 0, dataset, roots=roots):
        problem = ref_problem(ref.locator)
        if problem is not None:
            reason, rel, message = problem
            yield Clip(id=ref.id, dataset=dataset, audio_uri=f"{root}/{rel}", ingest_error=(reason, message))
            continue
        yield load(root, ref.locator, clip_id=ref.id, dataset=dataset, language=None, extra_labels={}, roots=roots)


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
