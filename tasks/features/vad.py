"""Fast energy voice-activity detection: how much of a clip is speech.

Why energy and not a neural VAD: the speaking rate only needs the total speech time, the
corpora we read are mostly read speech with clear pauses, and a 10 ms frame-energy threshold
costs microseconds per second of audio. The threshold adapts to each clip's own noise floor
and peak, so it works on quiet and on noisy recordings alike.
"""

from __future__ import annotations

import numpy as np

FRAME_S = 0.01
NOISE_PERCENTILE = 10  # the quietest 10% of frames estimate the noise floor
FLOOR_TO_PEAK_FRACTION = 0.3  # speech threshold sits 30% of the way from floor to peak (in dB) ...
MAX_BELOW_PEAK_DB = 45.0  # ... but never more than 45 dB below the loudest frame
MIN_GAP_S = 0.2  # pauses shorter than this (stop closures, word joins) count as speech
MIN_SPEECH_S = 0.03  # speech islands shorter than this (clicks) do not
POWER_FLOOR = 1e-10  # -100 dB; keeps log10 finite on digital silence
MIN_FRAME_DB = -80.0  # a frame quieter than this (RMS 1e-4, a few 16-bit steps) is never speech


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the True runs of a boolean mask."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _paint(length: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Boolean mask that is True on the given non-overlapping [start, end) spans."""
    delta = np.zeros(length + 1, dtype=np.int32)
    delta[starts] += 1
    delta[ends] -= 1
    return np.cumsum(delta[:-1]) > 0


def drop_short_runs(mask: np.ndarray, min_len: int) -> np.ndarray:
    """Set True runs shorter than `min_len` frames to False."""
    if min_len <= 1 or not mask.any():
        return mask
    starts, ends = _runs(mask)
    short = (ends - starts) < min_len
    if not short.any():
        return mask
    return mask & ~_paint(len(mask), starts[short], ends[short])


def fill_short_gaps(mask: np.ndarray, max_len: int) -> np.ndarray:
    """Set False gaps between two True runs to True when shorter than `max_len` frames."""
    if max_len <= 0 or not mask.any():
        return mask
    starts, ends = _runs(mask)
    gap_starts, gap_ends = ends[:-1], starts[1:]
    short = (gap_ends - gap_starts) < max_len
    if not short.any():
        return mask
    return mask | _paint(len(mask), gap_starts[short], gap_ends[short])


def frame_power(audio: np.ndarray, sr: int, frame_s: float = FRAME_S) -> np.ndarray:
    """Mean square of consecutive non-overlapping frames (a trailing partial frame is dropped)."""
    hop = max(1, round(frame_s * sr))
    n = len(audio) // hop
    if n == 0:
        return np.array([float(np.mean(np.square(audio, dtype=np.float64)))]) if len(audio) else np.zeros(1)
    frames = audio[: n * hop].reshape(n, hop)
    return np.einsum("ij,ij->i", frames, frames) / hop


def speech_mask(audio: np.ndarray, sr: int, frame_s: float = FRAME_S) -> np.ndarray:
    """One boolean per `frame_s` frame: True where the clip is (probably) speech.

    The clip's DC offset is removed first: a constant is not sound, and left in it would lift the
    noise floor (hiding pauses) or make a constant file look like one long stretch of speech.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if len(audio):
        audio = audio - np.float32(np.mean(audio, dtype=np.float64))
    power_db = 10.0 * np.log10(np.maximum(frame_power(audio, sr, frame_s), POWER_FLOOR))
    mask = mask_from_power_db(power_db)
    mask = fill_short_gaps(mask, round(MIN_GAP_S / frame_s))
    return drop_short_runs(mask, round(MIN_SPEECH_S / frame_s))


def mask_from_power_db(power_db: np.ndarray) -> np.ndarray:
    """Frames above the adaptive threshold (floor/peak of these frames), before gap filling; also
    used on a long recording's frame energies gathered block by block (tasks/segment/vad.py)."""
    peak = float(power_db.max())
    k = (len(power_db) - 1) * NOISE_PERCENTILE // 100
    floor = float(np.partition(power_db, k)[k])
    threshold = max(peak - MAX_BELOW_PEAK_DB, floor + FLOOR_TO_PEAK_FRACTION * (peak - floor))
    mask = power_db > threshold
    if peak <= floor:  # flat energy (a tone, stationary noise): no pauses to find
        mask[:] = True
    mask &= power_db > MIN_FRAME_DB  # digital silence is flat too, but it is not speech
    return mask


def speech_duration(audio: np.ndarray, sr: int, frame_s: float = FRAME_S) -> float:
    """Seconds of speech in the clip according to `speech_mask`."""
    hop = max(1, round(frame_s * sr))
    return float(np.count_nonzero(speech_mask(audio, sr, frame_s))) * hop / sr
