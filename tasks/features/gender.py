"""Speaker gender: the corpus label when there is one, else a pitch heuristic.

Why a pitch fallback: adult male speaking F0 clusters around 85-155 Hz and female around
165-255 Hz, so one threshold between them is right for most adult read speech and costs
nothing. It is wrong for children and for voices near the boundary, which is why it reports a
confidence that falls to 0.5 at the threshold and why a corpus label always wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

PITCH_THRESHOLD_HZ = 165.0
CONFIDENCE_SCALE_SEMITONES = 2.0  # logistic scale: 2 semitones from the threshold -> 0.73, 6 -> 0.95
LABEL_KEYS = ("gender", "sex")
_FEMALE = {"f", "female", "woman", "w", "fem", "feminine"}
_MALE = {"m", "male", "man", "masc", "masculine"}


def normalise_gender(value: str | None) -> str | None:
    """'F', 'Female', 'woman', 'w' ... -> 'female'; 'M', 'male', 'man' ... -> 'male'; else None."""
    if value is None:
        return None
    v = value.strip().lower()
    if v in _FEMALE:
        return "female"
    if v in _MALE:
        return "male"
    return None


def gender_from_labels(labels: Mapping[str, str]) -> str | None:
    """Normalised gender from a corpus label keyed 'gender' or 'sex' (any case), if recognisable."""
    by_key = {str(k).strip().lower(): v for k, v in labels.items()}
    for key in LABEL_KEYS:
        gender = normalise_gender(by_key.get(key))
        if gender is not None:
            return gender
    return None


def gender_from_pitch(pitch_mean_hz: float) -> tuple[str, float]:
    """('male' | 'female', confidence in [0.5, 1)) from mean F0 against `PITCH_THRESHOLD_HZ`."""
    distance = 12.0 * abs(math.log2(pitch_mean_hz / PITCH_THRESHOLD_HZ))  # semitones
    confidence = 1.0 / (1.0 + math.exp(-distance / CONFIDENCE_SCALE_SEMITONES))
    return ("male" if pitch_mean_hz < PITCH_THRESHOLD_HZ else "female"), confidence


def decide_gender(
    labels: Mapping[str, str], pitch_mean_hz: float | None, use_pitch: bool = True
) -> tuple[str | None, float | None, str | None]:
    """(gender, score, source): source 'corpus' (score 1.0), 'pitch_heuristic', or all None."""
    labelled = gender_from_labels(labels)
    if labelled is not None:
        return labelled, 1.0, "corpus"
    if use_pitch and pitch_mean_hz is not None and pitch_mean_hz > 0:
        gender, confidence = gender_from_pitch(pitch_mean_hz)
        return gender, confidence, "pitch_heuristic"
    return None, None, None
