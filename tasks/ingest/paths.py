"""Where a source may read, and how its folders are walked: the confinement rules for hostile input.

Audio paths are confined to the source's roots (`Roots.check`: symbolic links and `..` resolved,
stat'ed, never opened); folder walks never open a file, follow symbolic links only inside the
roots, detect loops and report the folders they cannot enter (`walk`); `prepare` runs one adapter
outside a run under the same roots. Kept apart from tasks/ingest/common.py because these rules
change with the threat model, not with a corpus layout.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from schemas.records import Clip, ReasonCode
from storage.sources import SourceReadError
from tasks.ingest import remote
from tasks.ingest.common import ClipRef, CorpusPath, SourceError, clean_id, problem_ref, ref_problem


@dataclass(frozen=True)
class Rejected:
    """Why an audio path is not read: the quarantine reason and message (naming the fix)."""

    reason: ReasonCode
    message: str

    def clip(self, clip_id: str, dataset: str, audio_uri: str) -> Clip:
        return Clip(id=clip_id, dataset=dataset, audio_uri=audio_uri, ingest_error=(self.reason, self.message))


def real_path(path: str) -> str:
    """`path` with `~`, symbolic links and `..` resolved: what confinement compares."""
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
            real = real_path(entry)
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
            real = real_path(path)
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
                real = _printable(real_path(entry.path))
                if not roots.contains(real_path(entry.path)):
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
                                      f"{_printable(real_path(entry.path))}, a folder above it); not followed: "
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
