"""DSP feature extraction for one clip: the measured values a description is built from.

The pipeline calls `extract_features` once per clip on 16 kHz mono float32 audio that the audio
stage has already validated (finite, within audio.max_peak, not silent once its DC offset is
removed, 0.3-30 s); the pipeline then quarantines speech-source clips whose `speech_duration_s`
is under audio.min_speech_s (`no_speech`). Everything here is plain numpy/scipy
on one thread, well under 2 ms of CPU per second of audio (see bench/features.py), so no model
and no GPU is needed for these columns. `EXTRACTOR_VERSIONS` goes into every row's provenance:
bump an entry whenever its algorithm or constants change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from schemas.config import FeaturesConfig
from schemas.records import Features
from tasks.features.gender import decide_gender
from tasks.features.loudness import integrated_loudness, sample_levels
from tasks.features.pitch import estimate_pitch
from tasks.features.rate import speaking_rates
from tasks.features.snr import wada_snr
from tasks.features.vad import speech_duration

__all__ = ["EXTRACTOR_VERSIONS", "extract_features"]

EXTRACTOR_VERSIONS: dict[str, str] = {
    "pitch": "yin-np/1",
    "loudness": "bs1770/1",
    "levels": "dbfs/1",
    "snr": "wada/1",
    "vad": "energy/2",  # 2: DC offset removed before the frame energies
    "rate": "syllable-heuristic/1",
    "gender": "label-or-pitch/1",
}

CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped (AudioConfig.clip_level's default)


def _finite(value: float | None) -> float | None:
    """Plain float, or None for missing / NaN / infinite values (rows never carry NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def extract_features(
    audio: np.ndarray,
    sr: int,
    transcript: str | None,
    labels: Mapping[str, str],
    config: FeaturesConfig = FeaturesConfig(),  # noqa: B008 - immutable pydantic model
) -> Features:
    """All DSP features of one clip; model-based fields (c50, emotion, age, accent, pps) stay None."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or len(audio) == 0:
        raise ValueError(f"expected non-empty mono audio, got shape {audio.shape}")
    pitch = estimate_pitch(audio, sr, config.pitch_fmin_hz, config.pitch_fmax_hz)
    levels = sample_levels(audio, CLIP_LEVEL)
    speech_s = speech_duration(audio, sr)
    wps, sps = speaking_rates(transcript, speech_s)
    gender, gender_score, gender_source = decide_gender(labels, pitch.mean_hz, config.gender_from_pitch)
    return Features(
        duration_s=len(audio) / sr,
        speech_duration_s=_finite(speech_s),
        voiced_ratio=_finite(pitch.voiced_ratio),
        pitch_mean_hz=_finite(pitch.mean_hz),
        pitch_std_hz=_finite(pitch.std_hz),
        loudness_lufs=_finite(integrated_loudness(audio, sr)),
        rms_dbfs=_finite(levels.rms_dbfs),
        peak_dbfs=_finite(levels.peak_dbfs),
        clipping_ratio=_finite(levels.clipping_ratio),
        snr_db=_finite(wada_snr(audio)),
        speaking_rate_wps=_finite(wps),
        speaking_rate_sps=_finite(sps),
        gender=gender,
        gender_score=_finite(gender_score),
        gender_source=gender_source,
    )
