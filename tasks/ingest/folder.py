"""Audio folders: every audio file below a directory, with optional sidecar transcripts.

A sidecar is `<name>.txt` or `<name>.lab` next to the audio. The clip id is the path relative to
the folder without its extension (stable across runs and machines). Walks lazily in sorted order.
Files that are neither audio nor sidecars are not clips, but they are counted (`skipped_files`)
so a run names what it left out instead of dropping a folder of .m4b or .pdf files silently.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from schemas.records import Clip
from tasks.ingest.common import AUDIO_SUFFIXES, ClipRef, iter_files

SIDECAR_SUFFIXES = (".txt", ".lab")
NO_EXTENSION = "(no extension)"


def is_audio_name(name: str) -> bool:
    return name.lower().endswith(AUDIO_SUFFIXES)


def iter_audio_files(root: Path) -> Iterator[str]:
    """Relative posix paths of audio files, depth-first in sorted order, without a full listing."""
    return iter_files(root, is_audio_name)


def iter_folder_refs(root: Path, source_index: int, dataset: str) -> Iterator[ClipRef]:
    for rel in iter_audio_files(root):
        local = rel.rsplit(".", 1)[0]
        yield ClipRef(id=f"{dataset}/{local}", source=source_index, locator=rel)


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
            counts[posixpath.splitext(lower)[1] or NO_EXTENSION] += 1
    return counts


def read_sidecar(audio_path: Path) -> str | None:
    for suffix in SIDECAR_SUFFIXES:
        side = audio_path.with_suffix(suffix)
        if side.is_file():
            text = " ".join(side.read_text(encoding="utf-8", errors="replace").split())
            return text or None
    return None


def folder_clip(root: Path, rel: str, *, clip_id: str, dataset: str, language: str | None,
                extra_labels: dict[str, str]) -> Clip:
    audio_path = root / rel
    return Clip(
        id=clip_id,
        dataset=dataset,
        audio_uri=str(audio_path.resolve()),
        transcript=read_sidecar(audio_path),
        language=language,
        labels=dict(extra_labels),
    )
