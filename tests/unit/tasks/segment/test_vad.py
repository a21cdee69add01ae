"""Segmentation of recordings built here from real sample clips and espeak-ng sentences separated by
known silences: the utterance edges are known, so the VAD's boundaries can be checked against them."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from schemas.config import SegmentConfig
from tasks.segment import segment_recording
from tasks.segment.vad import (
    SileroFrames,
    VADParams,
    load_silero_jit,
    refine_edges,
    silero_available,
    speech_regions,
    speech_seconds,
)
from tests.support.paths import SAMPLE_CORPUS
from tests.support.speech import SENTENCES, load_16k, trim_quiet

SR = 16_000
SAMPLES = SAMPLE_CORPUS / "audio"

needs_silero = pytest.mark.skipif(not silero_available(), reason="silero-vad not installed (models-cpu extra)")


@pytest.fixture(scope="module")
def utterances(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Trimmed real clips of examples/sample_corpus plus espeak-ng sentences (16 kHz mono)."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    folder = tmp_path_factory.mktemp("espeak")
    clips = []
    for i, text in enumerate(SENTENCES):
        out = folder / f"s{i}.wav"
        subprocess.run([binary, "-w", str(out), "-s", "160", text], check=True, capture_output=True)
        clips.append(trim_quiet(load_16k(out)))
    clips += [trim_quiet(load_16k(p)) for p in sorted(SAMPLES.iterdir()) if p.suffix in {".wav", ".flac", ".ogg"}]
    return clips


def build(utterances: list[np.ndarray], seed: int = 0,
          repeats: int = 1) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Utterances with seeded silences of 0.3-2 s between them; (audio, known utterance spans)."""
    rng = np.random.default_rng(seed)
    parts, spans, t = [], [], 0
    for _ in range(repeats):
        for utt in utterances:
            gap = int(rng.uniform(0.3, 2.0) * SR)
            parts.append(np.zeros(gap, np.float32))
            t += gap
            parts.append((utt * rng.uniform(0.5, 1.0)).astype(np.float32))
            spans.append((t / SR, (t + len(utt)) / SR))
            t += len(utt)
    parts.append(np.zeros(SR, np.float32))
    return np.concatenate(parts), spans


def boundary_f1(found: list[tuple[float, float]], known: list[tuple[float, float]], tol: float = 0.1) -> float:
    ref = sorted(b for span in known for b in span)
    hyp = sorted(b for span in found for b in span)
    used: set[int] = set()
    hits = 0
    for r in ref:
        close = [(abs(h - r), j) for j, h in enumerate(hyp) if j not in used and abs(h - r) <= tol]
        if close:
            used.add(min(close)[1])
            hits += 1
    if not hits:
        return 0.0
    precision, recall = hits / len(hyp), hits / len(ref)
    return 2 * precision * recall / (precision + recall)


@needs_silero
def test_batched_silero_equals_the_stock_streaming_model(utterances: list[np.ndarray]) -> None:
    import torch

    audio, _ = build(utterances[:3])
    audio = audio[: len(audio) // 512 * 512]
    stock = load_silero_jit()  # the wheel's TorchScript model, run frame by frame as silero does
    x = torch.from_numpy(audio)
    expected = np.array([stock(x[i:i + 512].unsqueeze(0), SR).item() for i in range(0, len(audio), 512)])
    ours = SileroFrames()
    for i in range(0, len(audio), 7_777):  # odd block sizes: frames straddle the joins
        ours.feed(audio[i:i + 7_777])
    probs = ours.probabilities()
    assert probs.shape == expected.shape
    assert np.max(np.abs(probs - expected)) < 1e-4
    assert probs.max() > 0.9 and probs.min() < 0.1  # speech and silence both present


@pytest.mark.parametrize("engine", [pytest.param("silero", marks=needs_silero), "energy"])
def test_utterance_edges_found_within_100_ms(utterances: list[np.ndarray], engine: str) -> None:
    audio, known = build(utterances)
    found = speech_regions([audio[i:i + 10 * SR] for i in range(0, len(audio), 10 * SR)],
                           VADParams(min_silence_s=0.25), engine)  # type: ignore[arg-type]
    assert len(found) == len(known), (found, known)
    # Every utterance lies inside exactly one region, starting and ending within 0.3 s of it.
    for (start, end), (got_start, got_end) in zip(known, found, strict=True):
        assert abs(got_start - start) < 0.3 and abs(got_end - end) < 0.3
    assert boundary_f1(found, known) >= (0.9 if engine == "silero" else 0.95)


@pytest.mark.parametrize("engine", [pytest.param("silero", marks=needs_silero), "energy"])
def test_speech_seconds_of_a_clip(utterances: list[np.ndarray], engine: str) -> None:
    audio, known = build(utterances[:3])
    truth = sum(end - start for start, end in known)
    assert speech_seconds(audio, SR, engine=engine) == pytest.approx(truth, rel=0.1)  # type: ignore[arg-type]
    assert speech_seconds(np.zeros(2 * SR, np.float32), SR, engine=engine) == 0.0  # type: ignore[arg-type]


@needs_silero
def test_segments_of_a_recording_file(utterances: list[np.ndarray], tmp_path: Path) -> None:
    """Whole path: file → blocks → silero → cut; every cut falls in a known silence."""
    audio, known = build(utterances, repeats=2)  # ~2.5 minutes
    path = tmp_path / "long.wav"
    sf.write(path, audio, SR, subtype="PCM_16")
    config = SegmentConfig(min_s=2.0, max_s=30.0, pad_s=0.15, block_s=20.0)
    segments = segment_recording(str(path), "rec", config)
    assert segments and all(2.0 <= s.duration_s <= 30.0 for s in segments)
    for a, b in known:  # each utterance lies in one segment (a quiet onset may lose a few frames)
        best = max(min(b, s.end_s) - max(a, s.start_s) for s in segments)
        assert best >= 0.9 * (b - a), f"utterance {a:.2f}-{b:.2f} s not inside one segment"
    assert sum(s.speech_s for s in segments) == pytest.approx(sum(b - a for a, b in known), rel=0.1)
    for left, right in itertools.pairwise(segments):
        assert left.end_s <= right.start_s
        cut = (left.end_s + right.start_s) / 2
        assert not any(a + 0.05 < cut < b - 0.05 for a, b in known), f"cut at {cut:.2f} s inside speech"


def test_refined_edges_stay_with_their_own_utterance() -> None:
    """A late Silero onset 0.3 s after the previous utterance's energy must not reach back into it
    (that joined utterances); its own energy onset 0.2 s earlier is taken, an end too."""
    silero = [(1.0, 2.0), (2.6, 4.0)]
    energy = [(0.98, 2.35), (2.4, 3.5), (3.6, 4.1)]  # the first utterance ends 0.35 s after silero's end
    assert refine_edges(silero, energy, 0.3) == [(0.98, 2.3), (2.4, 4.1)]  # ends move by 0.3 s at most
    # Sound that goes on through a Silero pause joins the two regions; an edge region out of reach
    # (a noise 0.5 s away) moves nothing.
    assert refine_edges([(1.0, 2.0), (2.2, 3.0)], [(1.0, 3.0)], 0.3) == [(1.0, 3.0)]
    assert refine_edges([(1.0, 2.0)], [(2.5, 2.7)], 0.3) == [(1.0, 2.0)]


@needs_silero
def test_silero_path_leaves_torch_threads_and_warnings_alone(tmp_path: Path) -> None:
    """Importing silero_vad sets torch's thread count to 1 for the whole process; our loader does not
    import it. Fresh interpreter (the model is cached per process), DeprecationWarnings as errors."""
    import sys

    code = ("import sys, numpy as np, torch\n"
            "torch.set_num_threads(3)\n"
            "from tasks.segment.vad import speech_regions\n"
            "tone = np.sin(np.arange(16000) * 0.1).astype(np.float32) * 0.3\n"
            "speech_regions([np.zeros(8000, np.float32), tone], engine='silero')\n"
            "print(torch.get_num_threads(), 'silero_vad' in sys.modules)\n")
    root = Path(__file__).resolve().parents[4]
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], cwd=root,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "False"]
