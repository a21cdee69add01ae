"""Audio folders: every wav/flac/mp3/ogg file below a directory, with optional sidecar transcripts.

A sidecar is `<name>.txt` or `<name>.lab` next to the audio. The clip id is the path relative to
the folder without its extension (stable across runs and machines). Walks lazily in sorted order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from schemas.records import Clip
from tasks.ingest.common import AUDIO_SUFFIXES, ClipRef

SIDECAR_SUFFIXES = (".txt", ".lab")


def iter_audio_files(root: Path) -> Iterator[str]:
    """Relative posix paths of audio files, depth-first in sorted order, without a full listing."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.lower().endswith(AUDIO_SUFFIXES) and not name.startswith("."):
                yield (rel_dir / name).as_posix()


def iter_folder_refs(root: Path, source_index: int, dataset: str) -> Iterator[ClipRef]:
    for rel in iter_audio_files(root):
        local = rel.rsplit(".", 1)[0]
        yield ClipRef(id=f"{dataset}/{local}", source=source_index, locator=rel)


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
