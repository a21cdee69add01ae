"""The order a human reads an attribute's values in: along its scale, never by count.

A distribution sorted by count reshuffles between versions and hides the shape of a scale
("Normal, Low, High, Very low"); read along the scale it shows where the mass sits. Scales come
from the bins (pitch, speed, volume: ascending feature, so Very low … Very high) and from the
canonical label vocabularies (tasks/features/labels.py: gender, emotion, age groups youngest
first, accents). The noise words run against their feature (more SNR, less noise), so they are
read reversed: Very low … Very high noise. Values outside a known scale follow: those that start
with a number by that number (ages, C50 dB, durations), the rest alphabetically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from schemas.attributes import ATTRIBUTE_LABELS
from tasks.describe import Bins
from tasks.features.labels import CANONICAL

_LEADING_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")


def _word(canonical: str) -> str:
    """A canonical label as it appears in a seed: first letter capitalised (describe's rule)."""
    return canonical[:1].upper() + canonical[1:]


def scale_words(label: str, bins: Bins) -> list[str]:
    """The known values of the attribute shown as `label` (e.g. "Pitch", "Noise level"), in scale order."""
    keys = {shown: key for key, shown in ATTRIBUTE_LABELS.items()}
    key = keys.get(label)
    if key == "pitch":
        return list(dict.fromkeys(w for scale in bins.pitch.scales.values() for w in scale.words))
    if key in ("speed", "volume"):
        return list(getattr(bins, key).words)
    if key == "noise":
        return list(reversed(bins.noise.words))
    if key in CANONICAL:
        return list(dict.fromkeys(_word(c) for c in CANONICAL[key].values()))
    return []


def in_scale_order(label: str, counts: Mapping[str, int], bins: Bins) -> list[tuple[str, int]]:
    """(value, count) pairs of one attribute, along its scale (see the module doc)."""
    rank = {w: i for i, w in enumerate(scale_words(label, bins))}

    def key(value: str) -> tuple[int, float, str]:
        if value in rank:
            return 0, rank[value], ""
        number = _LEADING_NUMBER.match(value)
        if number:
            return 1, float(number.group(1)), value.lower()
        return 2, 0.0, value.lower()

    return sorted(counts.items(), key=lambda kv: key(kv[0]))
