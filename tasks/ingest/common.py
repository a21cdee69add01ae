"""What every source layout shares: the light clip reference used for planning, and path rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus")


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
