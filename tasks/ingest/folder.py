"""Audio folders: every audio file below a directory, with optional sidecar transcripts.

A sidecar is `<name>.txt` or `<name>.lab` next to the audio. The clip id is the path relative to
the folder without its extension (stable across runs and machines; control characters
percent-encoded). Walks lazily in sorted order, opening no file (see `common.walk`): a folder it
cannot enter (unreadable, a link loop, a link to a folder outside the allowed roots) becomes a
quarantine row `<dataset>/<relative dir>/`. Files that are neither audio nor sidecars are not
clips, but they are counted (`skipped_files`) so a run names what it left out instead of dropping
a folder of .m4b or .pdf files silently.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from schemas.records import Clip
from tasks.ingest.common import (
    AUDIO_SUFFIXES,
    ClipRef,
    Rejected,
    Roots,
    SourceError,
    clean_id,
    make_id,
    read_small,
    walk,
)

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


def skipped_files(root: Path) -> Counter[str]:
    """Extension (lower case) → number of files below `root` that are neither audio nor sidecars.

    Hidden files and folders (`.DS_Store`, `.git/`) are not counted: they are never corpus content.
    """
    counts: Counter[str] = Counter()
    for _, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            lower = name.lower()
            if name.startswith(".") or lower.endswith(AUDIO_SUFFIXES) or lower.endswith(SIDECAR_SUFFIXES):
                continue
            counts[clean_id(posixpath.splitext(lower)[1]) or NO_EXTENSION] += 1  # clean: the plan is JSON
    return counts


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
