"""Audio folders: every audio file below a directory, with optional sidecar transcripts.

A sidecar is `<name>.txt` or `<name>.lab` next to the audio. The clip id is the path relative to
the folder without its extension (stable across runs and machines; control characters
percent-encoded). Walks lazily in sorted order, opening no file (see `paths.walk`): a folder it
cannot enter (unreadable, a link loop, a link to a folder outside the allowed roots) becomes a
quarantine row `<dataset>/<relative dir>/`. Files that are neither audio nor sidecars are not
clips, but they are counted (`skipped_files`) so a run names what it left out instead of dropping
a folder of .m4b or .pdf files silently.

An s3:// folder is listed instead of walked (one listing, sorted keys; hidden names left out), and
its sidecars are read per clip through storage/sources.py.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from schemas.records import Clip
from storage import sources
from tasks.ingest.common import AUDIO_SUFFIXES, ClipRef, SourceError, clean_id, make_id
from tasks.ingest.files import read_small
from tasks.ingest.paths import Rejected, Roots, walk

SIDECAR_SUFFIXES = (".txt", ".lab")
NO_EXTENSION = "(no extension)"


def is_audio_name(name: str) -> bool:
    return name.lower().endswith(AUDIO_SUFFIXES)


def iter_folder_refs(root: Path, source_index: int, dataset: str, roots: Roots | None = None) -> Iterator[ClipRef]:
    for item in walk(root, is_audio_name, roots):
        if isinstance(item, str):
            yield ClipRef(id=make_id(dataset, item.rsplit(".", 1)[0]), source=source_index, locator=item)
        else:
            yield item.ref(dataset, source_index)


def skipped_files(root: Path | str) -> Counter[str]:
    """Extension (lower case) → number of files below `root` that are neither audio nor sidecars.

    Hidden files and folders (`.DS_Store`, `.git/`) are not counted: they are never corpus content.
    An s3:// folder is counted from one listing (names only, nothing opened).
    """
    counts: Counter[str] = Counter()
    if sources.is_remote(root):
        names: Iterator[str] = (e.rel.rsplit("/", 1)[-1] for e in remote_listing(str(root)))
    else:
        names = (name for _, dirnames, filenames in _visible_walk(Path(root)) for name in filenames)
    for name in names:
        lower = name.lower()
        if name.startswith(".") or lower.endswith(AUDIO_SUFFIXES) or lower.endswith(SIDECAR_SUFFIXES):
            continue
        counts[clean_id(posixpath.splitext(lower)[1]) or NO_EXTENSION] += 1  # clean: the plan is JSON
    return counts


def _visible_walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield folder, dirnames, filenames


MAX_SIDECAR_BYTES = 1024 * 1024


def read_sidecar(audio_path: Path, roots: Roots | None = None) -> str | None:
    """The transcript next to the audio: a regular file inside the roots, else none."""
    roots = roots or Roots.of(audio_path.parent)
    for suffix in SIDECAR_SUFFIXES:
        side = audio_path.with_suffix(suffix)
        if side.is_file() and isinstance(roots.check(str(side)), str):
            try:
                text = " ".join(read_small(side, MAX_SIDECAR_BYTES).decode("utf-8", errors="replace").split())
            except (OSError, SourceError):
                return None
            return text or None
    return None


def folder_clip(root: Path, rel: str, *, clip_id: str, dataset: str, language: str | None,
                extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    audio_path = root / rel
    roots = roots or Roots.of(root)
    real = roots.check(str(audio_path))
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, str(audio_path))
    return Clip(
        id=clip_id,
        dataset=dataset,
        audio_uri=real,
        transcript=read_sidecar(audio_path, roots),
        language=language,
        labels=dict(extra_labels),
    )


def _visible(rel: str) -> bool:
    return not any(part.startswith(".") for part in rel.split("/"))


def remote_listing(root: str) -> list[sources.Entry]:
    """Every object below the remote folder `root` whose path has no hidden part (sorted by key);
    a listing that fails is a SourceError naming the URI and the setting to check."""
    try:
        return [e for e in sources.listing(root) if _visible(e.rel)]
    except sources.SourceReadError as exc:
        raise SourceError(f"source {root}: cannot be listed: {exc}") from None


def iter_remote_folder_refs(root: str, source_index: int, dataset: str) -> Iterator[ClipRef]:
    """A remote (s3://) folder's audio objects, from one listing: no object is opened."""
    for entry in remote_listing(root):
        if is_audio_name(entry.rel.rsplit("/", 1)[-1]):
            yield ClipRef(id=make_id(dataset, entry.rel.rsplit(".", 1)[0]), source=source_index, locator=entry.rel)


def read_remote_sidecar(audio_uri: str, roots: Roots) -> str | None:
    """The `.txt` / `.lab` transcript next to a remote clip (inside the roots), else none."""
    stem = audio_uri.rsplit(".", 1)[0]
    for suffix in SIDECAR_SUFFIXES:
        side = stem + suffix
        if not isinstance(roots.check(side), str):
            return None
        try:
            data = sources.read(side, max_bytes=MAX_SIDECAR_BYTES)
        except sources.SourceReadError as exc:
            if exc.problem == "missing":
                continue
            return None
        return " ".join(data.decode("utf-8", errors="replace").split()) or None
    return None


def remote_folder_clip(root: str, rel: str, *, clip_id: str, dataset: str, language: str | None,
                       extra_labels: dict[str, str], roots: Roots) -> Clip:
    """One clip of a remote folder: its URI (checked against the roots) and sidecar transcript."""
    uri = sources.join(root, rel)
    real = roots.check(uri)
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, uri)
    return Clip(id=clip_id, dataset=dataset, audio_uri=real, transcript=read_remote_sidecar(real, roots),
                language=language, labels=dict(extra_labels))
