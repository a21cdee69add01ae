"""Synthetic and real speech for tests: the 16 kHz rate, the espeak-ng sentence, resampling."""

from __future__ import annotations

import numpy as np
import soxr

SR = 16000
TEXT = ("The quick brown fox jumps over the lazy dog while seven happy children "
        "watch quietly from the old wooden fence.")


def to_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sr != SR:
        audio = soxr.resample(audio, sr, SR)
    return np.ascontiguousarray(audio, dtype=np.float32)
