"""Synthetic and real speech for tests: the 16 kHz rate, the espeak-ng sentence, resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SR = 16000
TEXT = ("The quick brown fox jumps over the lazy dog while seven happy children "
        "watch quietly from the old wooden fence.")
# Short sentences for recordings built by concatenation (tests of long-form segmentation).
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "She sells sea shells by the sea shore.",
             "Please call Stella and ask her to bring these things with her from the store."]


def to_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sr != SR:
        audio = soxr.resample(audio, sr, SR)
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_16k(path: Path) -> np.ndarray:
    """A file's audio as 16 kHz mono float32."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    return to_16k(audio.mean(axis=1, dtype=np.float32), rate)


def trim_quiet(audio: np.ndarray, level: float = 0.01) -> np.ndarray:
    """`audio` from its first to its last sample louder than `level`."""
    loud = np.flatnonzero(np.abs(audio) > level)
    return audio[loud[0]: loud[-1] + 1]
