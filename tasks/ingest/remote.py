"""`RemotePath`: an s3:// file or folder with the few pathlib methods the corpus adapters use.

Why: the named layouts (LibriSpeech, VCTK, Common Voice, CREMA-D, ESD) and lhotse manifests walk
a folder, test whether metadata files exist and read them. Handing them a `RemotePath` instead of a
`Path` keeps one code path per adapter for local and remote corpora; `paths.walk`, `files.read_small`,
`metadata_key` and `stat_key` accept either.

Costs: a walk is one listing of its folder (storage/sources.py, sizes and ETags). Existence tests
and stats below a listed folder are answered from that listing; elsewhere a HEAD (a file) or a
one-key listing (a folder). Answers are cached per process for `CACHE_TTL_S` so a shard loading
thousands of clips stats each chapter's transcript once, not once per clip; ingest calls `forget`
for a source before planning it and before its fingerprint, so those always look afresh.
Audio is never read here: clips stay URIs that the audio stage reads one object at a time.
"""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from storage import sources

CACHE_TTL_S = 600.0  # how stale a shard's view of a corpus's metadata may be (planning always re-lists)

_LOCK = threading.Lock()
_LISTINGS: dict[str, tuple[float, dict[str, sources.Entry]]] = {}  # folder uri (no slash) → rel → entry
_STATS: dict[str, tuple[float, sources.Entry | None]] = {}  # file uri → entry, None when missing
_DIRS: dict[str, tuple[float, bool]] = {}  # folder uri → whether anything lies below it


def forget(prefix: str) -> None:
    """Drop what is cached at or below `prefix` (and listings of folders above it): the next
    look is fresh. Ingest calls it per source before planning and fingerprinting."""
    prefix = prefix.rstrip("/")
    with _LOCK:
        for cache in (_LISTINGS, _STATS, _DIRS):
            for key in [k for k in cache if k == prefix or k.startswith(prefix + "/") or prefix.startswith(k + "/")]:
                del cache[key]


def _fresh(stamp: float) -> bool:
    return time.monotonic() - stamp < CACHE_TTL_S


def listing(folder: str, fresh: bool = False) -> dict[str, sources.Entry]:
    """rel → entry of every object below `folder` (one listing, cached unless `fresh`);
    SourceReadError if it fails."""
    folder = folder.rstrip("/")
    with _LOCK:
        cached = _LISTINGS.get(folder)
        if cached is not None and _fresh(cached[0]) and not fresh:
            return cached[1]
    entries = {e.rel: e for e in sources.listing(folder)}
    with _LOCK:
        _LISTINGS[folder] = (time.monotonic(), entries)
    return entries


def _covering(uri: str) -> tuple[str, dict[str, sources.Entry]] | None:
    """(rel below the folder, that folder's cached listing) for the deepest fresh listing holding `uri`."""
    with _LOCK:
        best = max((k for k, (stamp, _) in _LISTINGS.items() if uri.startswith(k + "/") and _fresh(stamp)),
                   key=len, default=None)
        return (uri[len(best) + 1:], _LISTINGS[best][1]) if best is not None else None


def entry(uri: str) -> sources.Entry | None:
    """The object at `uri` (None when there is none), from a listing or a cached HEAD."""
    found = _covering(uri)
    if found is not None:
        return found[1].get(found[0])
    with _LOCK:
        cached = _STATS.get(uri)
        if cached is not None and _fresh(cached[0]):
            return cached[1]
    try:
        result: sources.Entry | None = sources.stat(uri)
    except sources.SourceReadError as exc:
        if exc.problem != "missing":
            raise
        result = None
    with _LOCK:
        _STATS[uri] = (time.monotonic(), result)
    return result


def fresh_entry(uri: str) -> sources.Entry | None:
    """The object at `uri` now (a HEAD, never cached): for fingerprints."""
    try:
        return sources.stat(uri)
    except sources.SourceReadError as exc:
        if exc.problem != "missing":
            raise
        return None


def _has_objects(folder: str) -> bool:
    found = _covering(folder.rstrip("/") + "/")
    if found is not None:
        rel = found[0]
        return any(k.startswith(rel) for k in found[1]) if rel else bool(found[1])
    folder = folder.rstrip("/")
    with _LOCK:
        cached = _DIRS.get(folder)
        if cached is not None and _fresh(cached[0]):
            return cached[1]
    result = sources.has_objects(folder)
    with _LOCK:
        _DIRS[folder] = (time.monotonic(), result)
    return result


@dataclass(frozen=True)
class RemotePath:
    """An s3:// URI used where an adapter would use a `Path` (joining, names, existence tests)."""

    uri: str

    def __post_init__(self) -> None:
        scheme, _, rest = self.uri.partition("://")
        object.__setattr__(self, "uri", f"{scheme}://{posixpath.normpath(rest).lstrip('/')}")

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, rel: str) -> RemotePath:
        return RemotePath(f"{self.uri}/{rel}")

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> RemotePath:
        scheme, _, rest = self.uri.partition("://")
        return self if "/" not in rest else RemotePath(f"{scheme}://{rest.rsplit('/', 1)[0]}")

    @property
    def parents(self) -> list[RemotePath]:
        out, path = [], self
        while path.parent != path:
            path = path.parent
            out.append(path)
        return out

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.parent / (self.stem + suffix)

    def rel_to(self, other: RemotePath) -> str:
        """The posix path of this one below `other` (what `Path.relative_to(...).as_posix()` gives)."""
        return self.uri[len(other.uri.rstrip("/")) + 1:]

    def is_file(self) -> bool:
        return entry(self.uri) is not None

    def is_dir(self) -> bool:
        return _has_objects(self.uri)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def names(self) -> list[str]:
        """Sorted names of the files and folders right below this folder (from its listing)."""
        return sorted({rel.split("/", 1)[0] for rel in listing(self.uri)})

    def walk_files(self) -> Iterator[str]:
        """Relative paths of every object below (no hidden part), in a local walk's order: a folder's
        files (sorted) before its subfolders (sorted), depth first. One fresh listing."""
        rels = [rel for rel in listing(self.uri, fresh=True) if not any(p.startswith(".") for p in rel.split("/"))]
        yield from sorted(rels, key=_walk_order)


def _walk_order(rel: str) -> tuple[tuple[int, str], ...]:
    parts = rel.split("/")
    return (*((1, p) for p in parts[:-1]), (0, parts[-1]))


__all__ = ["CACHE_TTL_S", "RemotePath", "entry", "forget", "fresh_entry", "listing"]
