"""Trainer exports of a committed version: a JSONL in the trainer's layout plus the audio files.

    export_desta(store, "demo", "v0003", Path("out"))               # DeSTA2.5-Audio
    export_desta2(store, "demo", "v0003", Path("out"))              # DeSTA2 (NeMo recipe)

`core` streams rows, writes audio (resumable) and the JSONL; each format module builds one line.
"""

from __future__ import annotations

from pathlib import Path

from storage.export.core import (
    AUDIO_DIR,
    AudioFile,
    ExportError,
    ExportFormat,
    ExportReport,
    RowError,
    audio_extension,
    export_version,
    relative_audio_path,
)
from storage.export.desta2 import Desta2Format
from storage.export.desta25 import (
    AUDIO_END,
    AUDIO_MARKER,
    AUDIO_START,
    Desta25Format,
    Desta25Options,
    default_system,
)
from storage.objectstore import ObjectStore


def export_desta(store: ObjectStore, dataset: str, version: str, dest: Path, options: Desta25Options | None = None,
                 *, jsonl_name: str | None = None, progress: bool = False) -> ExportReport:
    """DeSTA2.5-Audio layout: `dest/<dataset>.jsonl` (system + user turns, `response`) and `dest/audio/…`."""
    return export_version(store, dataset, version, dest, Desta25Format(options), jsonl_name=jsonl_name,
                          progress=progress)


def export_desta2(store: ObjectStore, dataset: str, version: str, dest: Path, *, jsonl_name: str | None = None,
                  progress: bool = False) -> ExportReport:
    """DeSTA2 NeMo layout: `dest/<dataset>.desta2.jsonl` (audio_filepath, duration, transcription,
    input, target) and `dest/audio/…`."""
    return export_version(store, dataset, version, dest, Desta2Format(), jsonl_name=jsonl_name, progress=progress)


__all__ = [
    "AUDIO_DIR",
    "AUDIO_END",
    "AUDIO_MARKER",
    "AUDIO_START",
    "AudioFile",
    "Desta2Format",
    "Desta25Format",
    "Desta25Options",
    "ExportError",
    "ExportFormat",
    "ExportReport",
    "RowError",
    "audio_extension",
    "default_system",
    "export_desta",
    "export_desta2",
    "export_version",
    "relative_audio_path",
]
