"""Benchmark of the model-based extractors: batch 1 vs batch 16, on ONE CPU thread by default.

For each model it prints clips per second and × real time per core (seconds of audio processed
per wall second on one thread) at batch size 1 and 16, and their ratio. Target: batching is not
slower on CPU (ratio >= 1.0); on a GPU (`--device cuda`) it should be >= 3x faster per clip.
The models are tiny random-weight ones built locally (tests/support/tiny_models.py): nothing is
downloaded, and the figures measure our batching and pre/post-processing around the model, not
the accuracy or the speed of a real checkpoint.

    .venv/bin/python bench/models.py [--clips 32] [--sample-len 32] [--device cpu]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas.config import ASRConfig
from tests.support.tiny_models import build_micro_whisper

SR = 16000
CORPUS_AUDIO = ROOT / "examples" / "sample_corpus" / "audio"
BATCH_SIZES = (1, 16)
TARGET_CPU_RATIO = 1.0
TARGET_GPU_RATIO = 3.0


def load_clips(n: int) -> list[np.ndarray]:
    """The sample corpus's clips at 16 kHz mono float32, repeated to `n` clips."""
    base = []
    for path in sorted(CORPUS_AUDIO.iterdir()):
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if sr != SR:
            audio = soxr.resample(audio, sr, SR)
        base.append(np.ascontiguousarray(audio, dtype=np.float32))
    return [base[i % len(base)] for i in range(n)]


@dataclass
class Measurement:
    label: str
    batch_size: int
    clips: int
    audio_s: float
    wall_s: float

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.wall_s

    @property
    def xrt(self) -> float:
        return self.audio_s / self.wall_s

    def line(self, per: str) -> str:
        return (f"{self.label:<28} batch {self.batch_size:>3}: {self.clips} clips in {self.wall_s:6.2f} s  "
                f"{self.clips_per_s:7.2f} clips/s  {self.xrt:8.1f}x real time {per}")


def measure(label: str, batch_size: int, run_all: Callable[[list[np.ndarray]], Sequence[Any]],
            clips: list[np.ndarray], repeats: int = 1) -> Measurement:
    """Best of `repeats` timed calls of `run_all(clips)` (after one warm-up call on two clips)."""
    run_all(clips[:2])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = run_all(clips)
        best = min(best, time.perf_counter() - start)
        assert len(out) == len(clips), f"{label}: {len(out)} results for {len(clips)} clips"
    return Measurement(label, batch_size, len(clips), sum(len(c) for c in clips) / SR, best)


def report(results: list[Measurement], device: str) -> float:
    per = "per core" if device == "cpu" else f"on {device}"
    for m in results:
        print(m.line(per))
    one = next(m for m in results if m.batch_size == 1)
    big = max(results, key=lambda m: m.batch_size)
    ratio = big.clips_per_s / one.clips_per_s
    target = TARGET_CPU_RATIO if device == "cpu" else TARGET_GPU_RATIO
    verdict = "OK" if ratio >= target else "BELOW TARGET"
    print(f"{one.label:<28} batch {big.batch_size} vs 1: {ratio:.2f}x clips/s (target >= {target:.1f}x) {verdict}")
    return ratio


# --- whisper ---
def bench_whisper(clips: list[np.ndarray], workdir: Path, device: str, sample_len: int,
                  repeats: int) -> float:
    from tasks.features.asr import ASRResult, load_transcriber

    ckpt = build_micro_whisper(workdir / "micro-whisper.pt")
    results = []
    for batch_size in BATCH_SIZES:
        # Guards off: every clip goes the whole way (decode + segments), none stops early.
        config = ASRConfig(enabled=True, model=str(ckpt), device=device,  # type: ignore[arg-type]
                           batch_size=batch_size, no_speech_threshold=1.0, logprob_threshold=-1e9,
                           compression_ratio_threshold=1e9)
        transcriber = load_transcriber(config, sample_len=sample_len)
        m = measure("whisper (micro, 1 layer)", batch_size, transcriber.transcribe, clips, repeats)
        sample = transcriber.transcribe(clips[:1])[0]
        assert isinstance(sample, ASRResult), sample
        results.append(m)
    print(f"whisper: {transcriber.model_name.rsplit('/', 1)[-1]} on {transcriber.device}, fp16={transcriber.fp16}, "
          f"greedy, up to {sample_len} tokens per clip, 30-s windows")
    return report(results, device)


# --- classifiers ---
def bench_classifiers(clips: list[np.ndarray], workdir: Path, device: str, repeats: int) -> float:
    """The tiny wav2vec2 emotion classifier through `AttributeClassifier.classify` (feature
    extractor padding + attention mask, forward, softmax, label map), batch 1 vs 16."""
    from schemas.config import ClassifierConfig
    from tasks.features.classifiers import load_classifiers
    from tests.support.tiny_models import build_tiny_audio_classifier

    model_dir = build_tiny_audio_classifier(workdir / "tiny-classifier", ["ang", "hap", "neu", "sad"])
    results = []
    for batch_size in BATCH_SIZES:
        config = ClassifierConfig(attribute="emotion", model=str(model_dir), device=device,  # type: ignore[arg-type]
                                  batch_size=batch_size)
        (classifier,) = load_classifiers([config])
        m = measure("classifier (wav2vec2, 2 layers)", batch_size, classifier.classify, clips, repeats)
        sample = classifier.classify(clips[:1])[0]
        assert isinstance(sample, tuple), sample
        results.append(m)
    print(f"classifier: tiny wav2vec2 (32 wide, 7 conv + 2 transformer layers) on {classifier.device}, "
          f"clips sorted by length into batches, attention mask on")
    return report(results, device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32, help="clips per timed run (sample corpus, repeated)")
    parser.add_argument("--sample-len", type=int, default=32,
                        help="Whisper tokens decoded per clip (a short clip's transcript is ~10-40)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the best is kept")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    clips = load_clips(args.clips)
    print(f"{len(clips)} clips, {sum(len(c) for c in clips) / SR:.1f} s of audio; torch threads "
          f"{torch.get_num_threads()}, device {device}")
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        workdir = Path(tmp)
        ratios = {"whisper": bench_whisper(clips, workdir, device, args.sample_len, args.repeats)}
        ratios["classifier"] = bench_classifiers(clips, workdir, device, args.repeats)  # --- classifiers ---
    target = TARGET_CPU_RATIO if device == "cpu" else TARGET_GPU_RATIO
    return 0 if all(r >= target for r in ratios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
