"""Fundamental frequency (F0) with a vectorised YIN (de Cheveigné & Kawahara, JASA 2002).

Why our own tracker: librosa.pyin is ~40x slower (an HMM over a fine pitch grid) and would pull
librosa and numba into the runtime. Describing a clip only needs the mean and spread of F0 over
voiced frames, which YIN gives reliably at a fraction of the cost: audio is resampled to 8 kHz
(speech harmonics below 4 kHz carry the pitch), every 10 ms frame's difference function comes
from FFT cross-correlations computed for all frames at once, and the voicing decision is the
YIN aperiodicity plus an energy gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr
from numpy.lib.stride_tricks import sliding_window_view

from tasks.features.vad import drop_short_runs

ANALYSIS_SR = 8000
HOP_S = 0.01
WINDOW_S = 0.025  # YIN integration window; longer than the longest period at fmin=60 Hz
TROUGH_THRESHOLD = 0.1  # YIN "absolute threshold": first dip of the normalised difference below it
VOICING_THRESHOLD = 0.35  # a frame is voiced when its aperiodicity (dip depth) is below this ...
ENERGY_GATE_DB = 40.0  # ... and its energy is within 40 dB of the loudest frame
MIN_VOICED_RUN = 3  # isolated voiced frames (< 30 ms) are usually errors
OCTAVE_TOLERANCE = 0.85  # voiced frames further than this (octaves) from the median are octave errors
MIN_VOICED_FRAMES = 5  # fewer voiced frames than this: no pitch statistics


@dataclass(frozen=True)
class PitchTrack:
    """Per-frame F0 estimate (Hz), voicing decision and YIN aperiodicity, one per `hop_s`."""

    f0_hz: np.ndarray
    voiced: np.ndarray
    aperiodicity: np.ndarray
    hop_s: float


@dataclass(frozen=True)
class PitchStats:
    mean_hz: float | None
    std_hz: float | None
    voiced_ratio: float


def track_pitch(audio: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 500.0) -> PitchTrack:
    """YIN F0 track of a mono clip; `f0_hz` is meaningful only where `voiced` is True."""
    x = soxr.resample(audio, sr, ANALYSIS_SR, quality="LQ") if sr != ANALYSIS_SR else audio
    x = np.ascontiguousarray(x, dtype=np.float32)
    hop = round(HOP_S * ANALYSIS_SR)
    tau_min = max(2, int(ANALYSIS_SR // fmax))
    tau_max = max(tau_min + 2, int(np.ceil(ANALYSIS_SR / fmin)))
    win = max(round(WINDOW_S * ANALYSIS_SR), tau_max)
    span = win + tau_max + 2  # samples a frame needs for lags 0 .. tau_max + 1
    if len(x) < span:
        x = np.pad(x, (0, span - len(x)))
    n_frames = 1 + (len(x) - span) // hop
    frames = sliding_window_view(x, span)[::hop][:n_frames]

    import scipy.fft  # here: ~0.6 s to import, and a CLI start measures no pitch

    # r[t, tau] = sum_{j<win} x[t+j] x[t+j+tau], for all frames at once (no circular wrap: n >= span).
    n_fft = scipy.fft.next_fast_len(span, real=True)
    spec_win = scipy.fft.rfft(frames[:, :win], n_fft, axis=1)
    spec_all = scipy.fft.rfft(frames, n_fft, axis=1)
    np.conjugate(spec_win, out=spec_win)
    spec_win *= spec_all
    r = scipy.fft.irfft(spec_win, n_fft, axis=1)[:, : tau_max + 2]

    # energy[t, tau] = sum_{j<win} x[t+tau+j]^2 from one running sum over the whole clip.
    cum = np.concatenate(([0.0], np.cumsum(np.square(x, dtype=np.float64))))
    win_energy = (cum[win:] - cum[:-win]).astype(np.float32)
    energy = sliding_window_view(win_energy, tau_max + 2)[::hop][:n_frames]

    # YIN difference function and its cumulative-mean normalisation (d'(0) = 1 by definition).
    diff = energy[:, :1] + energy - 2.0 * r
    np.maximum(diff, 0.0, out=diff)
    diff = diff[:, 1:]
    running = np.cumsum(diff, axis=1)
    lags = np.arange(1, tau_max + 2, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        cmnd = np.where(running > 0, diff * lags / running, 1.0).astype(np.float32)

    # Lags tau_min-1 .. tau_max+1 (index = lag - 1): the candidates plus one neighbour each side.
    seg = cmnd[:, tau_min - 2 : tau_max + 1]
    core = seg[:, 1:-1]
    trough = (core <= seg[:, :-2]) & (core < seg[:, 2:]) & (core < TROUGH_THRESHOLD)
    has_trough = trough.any(axis=1)
    best = np.where(has_trough, trough.argmax(axis=1), core.argmin(axis=1)) + 1  # index into seg
    rows = np.arange(n_frames)
    left, mid, right = seg[rows, best - 1], seg[rows, best], seg[rows, best + 1]
    curvature = left - 2.0 * mid + right
    safe = np.where(np.abs(curvature) > 1e-9, curvature, 1.0)
    shift = np.clip(np.where(np.abs(curvature) > 1e-9, 0.5 * (left - right) / safe, 0.0), -1.0, 1.0)
    lag = (best + tau_min - 1) + shift
    f0 = ANALYSIS_SR / lag

    frame_energy = energy[:, 0]
    loud_enough = frame_energy > frame_energy.max() * 10.0 ** (-ENERGY_GATE_DB / 10.0)
    voiced = (mid < VOICING_THRESHOLD) & loud_enough & (f0 >= fmin) & (f0 <= fmax)
    return PitchTrack(f0_hz=f0.astype(np.float64), voiced=voiced, aperiodicity=mid, hop_s=hop / ANALYSIS_SR)


def clean_voicing(track: PitchTrack) -> np.ndarray:
    """Voiced mask without isolated frames and without octave jumps away from the clip's median F0."""
    voiced = drop_short_runs(track.voiced, MIN_VOICED_RUN)
    if np.count_nonzero(voiced) >= MIN_VOICED_FRAMES:
        median = np.median(track.f0_hz[voiced])
        voiced = voiced & (np.abs(np.log2(track.f0_hz / median)) <= OCTAVE_TOLERANCE)
    return voiced


def pitch_stats(track: PitchTrack) -> PitchStats:
    """Mean and standard deviation of F0 over the clean voiced frames, and the voiced share."""
    voiced = clean_voicing(track)
    n_voiced = int(np.count_nonzero(voiced))
    ratio = n_voiced / len(voiced) if len(voiced) else 0.0
    if n_voiced < MIN_VOICED_FRAMES:
        return PitchStats(mean_hz=None, std_hz=None, voiced_ratio=ratio)
    f0 = track.f0_hz[voiced]
    return PitchStats(mean_hz=float(f0.mean()), std_hz=float(f0.std()), voiced_ratio=ratio)


def estimate_pitch(audio: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 500.0) -> PitchStats:
    """Pitch statistics of a clip: `pitch_stats(track_pitch(...))`."""
    return pitch_stats(track_pitch(audio, sr, fmin, fmax))
