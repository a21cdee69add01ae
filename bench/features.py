"""Benchmark of the DSP feature extractors on the sample corpus, on ONE thread.

Prints, per extractor and for `extract_features` as a whole, how many seconds of audio one CPU
core processes per second (x real time), and how much faster our YIN tracker is than a
librosa.pyin-based pitch extractor on the same clips. Targets: total >= 500x real time per
core, pitch >= 20x faster than pyin.

    .venv/bin/python bench/features.py [--min-audio-s 60] [--repeats 5] [--pyin-s 12]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.config import FeaturesConfig
from tasks.features import extract_features
from tasks.features.gender import decide_gender
from tasks.features.loudness import integrated_loudness, sample_levels
from tasks.features.pitch import estimate_pitch
from tasks.features.rate import speaking_rates
from tasks.features.snr import wada_snr
from tasks.features.vad import speech_duration

SR = 16000
CORPUS = ROOT / "examples" / "sample_corpus"
TARGET_TOTAL_XRT = 500.0
TARGET_PYIN_RATIO = 20.0

Clip = tuple[np.ndarray, str | None, dict[str, str]]


def load_corpus(min_audio_s: float) -> list[Clip]:
    """Sample-corpus clips at 16 kHz mono, the list repeated until it holds >= min_audio_s."""
    clips: list[Clip] = []
    for line in (CORPUS / "manifest.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        audio, sr = sf.read(CORPUS / row["path"], dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if sr != SR:
            audio = soxr.resample(audio, sr, SR)
        clips.append((np.ascontiguousarray(audio, dtype=np.float32), row.get("transcript"), {}))
    base = list(clips)
    while sum(len(a) for a, _, _ in clips) / SR < min_audio_s:
        clips.extend(base)
    return clips


def cpu_seconds(fn: Callable[[Clip], object], clips: list[Clip], repeats: int) -> float:
    """Best-of-`repeats` process CPU time of running `fn` over all clips (after one warm-up pass)."""
    for clip in clips[: min(len(clips), 10)]:
        fn(clip)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for clip in clips:
            fn(clip)
        best = min(best, time.process_time() - start)
    return best


def pyin_pitch(audio: np.ndarray) -> float:
    """The reference: librosa.pyin mean F0 over voiced frames (fmin 60, fmax 500, 10 ms hop)."""
    import librosa

    f0, voiced, _ = librosa.pyin(audio, fmin=60.0, fmax=500.0, sr=SR, frame_length=1024, hop_length=160)
    return float(np.nanmean(f0[voiced])) if voiced.any() else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-audio-s", type=float, default=60.0, help="repeat the corpus up to this much audio")
    parser.add_argument("--repeats", type=int, default=5, help="timing passes; the best one is reported")
    parser.add_argument("--pyin-s", type=float, default=12.0, help="seconds of audio to time pyin on")
    args = parser.parse_args()

    clips = load_corpus(args.min_audio_s)
    audio_s = sum(len(a) for a, _, _ in clips) / SR
    config = FeaturesConfig()
    print(f"features bench: {len(clips)} clips, {audio_s:.1f} s of audio, 1 thread, "
          f"best of {args.repeats} passes (process CPU time)")

    fmin, fmax = config.pitch_fmin_hz, config.pitch_fmax_hz
    extractors: dict[str, Callable[[Clip], object]] = {
        "pitch (yin-np)": lambda c: estimate_pitch(c[0], SR, fmin, fmax),
        "loudness (bs1770)": lambda c: integrated_loudness(c[0], SR),
        "levels (rms/peak/clip)": lambda c: sample_levels(c[0]),
        "snr (wada)": lambda c: wada_snr(c[0]),
        "vad (energy)": lambda c: speech_duration(c[0], SR),
        "rate (syllables)": lambda c: speaking_rates(c[1], 3.0),
        "gender (label/pitch)": lambda c: decide_gender(c[2], 120.0),
    }
    print(f"{'extractor':<26}{'CPU ms / s audio':>18}{'x real time':>14}")
    for name, fn in extractors.items():
        cpu = cpu_seconds(fn, clips, args.repeats)
        print(f"{name:<26}{1000 * cpu / audio_s:>18.3f}{audio_s / cpu:>14.0f}")
        if name.startswith("pitch"):
            ours_ms_per_s = 1000 * cpu / audio_s

    total = cpu_seconds(lambda c: extract_features(c[0], SR, c[1], c[2], config), clips, args.repeats)
    total_xrt = audio_s / total
    print(f"{'extract_features (total)':<26}{1000 * total / audio_s:>18.3f}{total_xrt:>14.0f}")

    # pyin is ~0.15 s of CPU per second of audio: time it on a subset and compare per second of audio.
    subset: list[Clip] = []
    for clip in clips:
        if sum(len(a) for a, _, _ in subset) / SR >= args.pyin_s:
            break
        subset.append(clip)
    subset_s = sum(len(a) for a, _, _ in subset) / SR
    pyin_pitch(subset[0][0][:SR])  # warm-up: librosa import and numba compilation
    start = time.process_time()
    pyin_means = [pyin_pitch(audio) for audio, _, _ in subset]
    pyin_cpu = time.process_time() - start
    pyin_ms_per_s = 1000 * pyin_cpu / subset_s
    our_means = [estimate_pitch(audio, SR, fmin, fmax).mean_hz for audio, _, _ in subset]
    deviation = [abs(o / p - 1) for o, p in zip(our_means, pyin_means, strict=True) if o and np.isfinite(p)]
    ratio = pyin_ms_per_s / ours_ms_per_s
    print(f"{'pitch (librosa.pyin)':<26}{pyin_ms_per_s:>18.3f}{subset_s / pyin_cpu:>14.0f}"
          f"   (timed on {subset_s:.1f} s of audio)")
    if deviation:
        print(f"pitch mean vs pyin on those clips: median |difference| {100 * float(np.median(deviation)):.1f} %, "
              f"max {100 * max(deviation):.1f} %")

    verdict = {True: "PASS", False: "MISS"}
    print(f"target total >= {TARGET_TOTAL_XRT:.0f}x real time per core: {total_xrt:.0f}x  "
          f"{verdict[total_xrt >= TARGET_TOTAL_XRT]}")
    print(f"target pitch >= {TARGET_PYIN_RATIO:.0f}x faster than pyin: {ratio:.0f}x  "
          f"{verdict[ratio >= TARGET_PYIN_RATIO]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
