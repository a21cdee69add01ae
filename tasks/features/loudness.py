"""Programme loudness (ITU-R BS.1770-4 integrated LUFS) and simple sample levels (dBFS, clipping).

Why our own BS.1770 instead of pyloudnorm: pyloudnorm gates its 400 ms blocks in a Python loop
and refuses clips shorter than one block; here the K-weighting is one `sosfilt` call and the
gating works on 100 ms sub-block sums, so a 30 s clip costs a fraction of a millisecond. The
filter coefficients follow libebur128's closed form for any sample rate (exactly the BS.1770
table at 48 kHz). The tests check agreement with pyloudnorm.

Clips shorter than one 400 ms gating block (the audio stage admits clips from 0.3 s) are
measured as a single block spanning the whole clip: the mean-square of the K-weighted clip,
gated only by the -70 LUFS absolute gate. Zero-padding to 400 ms would instead understate the
loudness by up to 10*log10(0.4/0.3) = 1.2 dB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

BLOCK_S = 0.4
STEP_S = 0.1  # 75 % overlap: a block is four consecutive 100 ms sub-blocks
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0
POWER_FLOOR = 1e-12  # -120 dB; keeps logs finite on digital silence


@cache
def k_weighting_sos(sr: int) -> np.ndarray:
    """BS.1770 K-weighting (high-shelf 'head' filter, then RLB high-pass) as second-order sections."""
    # Stage 1: high shelf, +4 dB above ~1.7 kHz.
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / sr)
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh**0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf = [(vh + vb * k / q + k * k) / a0, 2.0 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0,
             1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0]
    # Stage 2: second-order high-pass at ~38 Hz.
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / sr)
    a0 = 1.0 + k / q + k * k
    highpass = [1.0, -2.0, 1.0, 1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0]
    return np.array([shelf, highpass])


def _lufs(mean_square: np.ndarray | float) -> np.ndarray | float:
    return -0.691 + 10.0 * np.log10(np.maximum(mean_square, POWER_FLOOR))


def integrated_loudness(audio: np.ndarray, sr: int) -> float:
    """Gated integrated loudness of a mono clip in LUFS (see the module docstring for short clips)."""
    from scipy.signal import sosfilt  # here, not at import: scipy.signal costs ~1 s to import

    weighted = sosfilt(k_weighting_sos(sr), audio)
    step = round(STEP_S * sr)
    per_block = round(BLOCK_S / STEP_S)
    n_sub = len(weighted) // step
    if n_sub < per_block:
        return float(_lufs(float(np.dot(weighted, weighted)) / len(weighted)))
    sub = weighted[: n_sub * step].reshape(n_sub, step)
    sub_energy = np.einsum("ij,ij->i", sub, sub)
    running = np.concatenate(([0.0], np.cumsum(sub_energy)))
    block_ms = (running[per_block:] - running[:-per_block]) / (per_block * step)
    block_lufs = _lufs(block_ms)
    above_abs = np.asarray(block_lufs > ABSOLUTE_GATE_LUFS)
    if not above_abs.any():  # quieter than -70 LUFS throughout: report the ungated level
        return float(_lufs(block_ms.mean()))
    relative_gate = _lufs(block_ms[above_abs].mean()) + RELATIVE_GATE_LU
    gated = block_ms[block_lufs > max(ABSOLUTE_GATE_LUFS, relative_gate)]
    return float(_lufs(gated.mean()))


@dataclass(frozen=True)
class Levels:
    rms_dbfs: float
    peak_dbfs: float
    clipping_ratio: float


def sample_levels(audio: np.ndarray, clip_level: float = 0.999) -> Levels:
    """RMS and peak in dBFS (a full-scale square wave is 0 dBFS RMS) and the clipped-sample share."""
    magnitude = np.abs(audio)
    peak = float(magnitude.max()) if len(magnitude) else 0.0
    mean_square = float(np.dot(audio, audio)) / max(len(audio), 1)
    clipped = int(np.count_nonzero(magnitude >= clip_level))
    return Levels(
        rms_dbfs=10.0 * math.log10(max(mean_square, POWER_FLOOR)),
        peak_dbfs=20.0 * math.log10(max(peak, math.sqrt(POWER_FLOOR))),
        clipping_ratio=clipped / max(len(audio), 1),
    )
