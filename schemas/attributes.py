"""The attribute vocabulary of seed descriptions: config key → label written in the seed."""

from __future__ import annotations

# Order here is only the catalogue; the seed uses the order given in `describe.attributes`.
ATTRIBUTE_LABELS: dict[str, str] = {
    "gender": "Gender",
    "emotion": "Emotion",
    "age": "Age",
    "accent": "Accent",
    "pitch": "Pitch",
    "speed": "Speaking speed",
    "volume": "Volume",
    "noise": "Noise level",
    "reverb": "Reverberation",
    "duration": "Duration",
}

KNOWN_ATTRIBUTES = frozenset(ATTRIBUTE_LABELS)
