"""The bounded-memory reader: block sizes, continuity across joins, span reads, MP3 via ffmpeg."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from schemas.config import SegmentConfig
from schemas.records import QuarantineError, ReasonCode
from tasks.segment import segment_recording
from tasks.segment.blocks import iter_blocks, read_segment, recording_info
from tasks.segment.vad import silero_available
from tests.support.paths import SAMPLE_CORPUS

SR = 16_000
SAMPLES = SAMPLE_CORPUS / "audio"


def _speechy(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Real sample clips with seeded silences, resampled to `rate` (a stand-in long recording)."""
    rng = np.random.default_rng(seed)
    clips = []
    for path in sorted(SAMPLES.glob("*.wav")) + sorted(SAMPLES.glob("*.flac")):
        audio, sr = sf.read(path, dtype="float32")
        clips.append(soxr.resample(audio, sr, rate).astype(np.float32) if sr != rate else audio)
    parts, total = [], 0
    while total < seconds * rate:
        gap = np.zeros(int(rng.uniform(0.3, 2.0) * rate), np.float32)
        clip = clips[int(rng.integers(len(clips)))]
        parts += [gap, clip]
        total += len(gap) + len(clip)
    return np.concatenate(parts)[: int(seconds * rate)]


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("long")
    audio = _speechy(75.0, 44_100)
    stereo = np.stack([audio, 0.5 * audio], axis=1)
    out = {"wav": folder / "rec.wav", "flac": folder / "rec.flac"}
    sf.write(out["wav"], stereo, 44_100, subtype="PCM_16")
    sf.write(out["flac"], stereo, 44_100, subtype="PCM_16")
    if shutil.which("ffmpeg"):
        out["mp3"] = folder / "rec.mp3"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(out["wav"]), "-b:a", "96k", str(out["mp3"])],
                       check=True)
    return out


@pytest.mark.parametrize(("kind", "block_s"), [("wav", 3.0), ("wav", 7.3), ("flac", 5.0), ("mp3", 4.0)])
def test_blocks_never_exceed_a_block(recordings: dict[str, Path], kind: str, block_s: float) -> None:
    if kind not in recordings:
        pytest.skip("ffmpeg not installed")
    blocks = list(iter_blocks(str(recordings[kind]), block_s))
    size = round(block_s * SR)
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert all(len(b) == size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= size
    total = sum(len(b) for b in blocks) / SR
    assert total == pytest.approx(75.0, abs=0.1)  # MP3 may add an encoder frame of padding


def test_block_joins_are_seamless(recordings: dict[str, Path]) -> None:
    """Small and large blocks give the same samples: the resampler state runs on across joins."""
    small = np.concatenate(list(iter_blocks(str(recordings["wav"]), 1.1)))
    large = np.concatenate(list(iter_blocks(str(recordings["wav"]), 60.0)))
    assert len(small) == len(large)
    assert np.max(np.abs(small - large)) < 1e-6
    assert np.max(np.abs(large)) > 0.1  # real audio, not silence


@pytest.mark.parametrize("kind", ["wav", "mp3"])
def test_read_segment_matches_the_stream(recordings: dict[str, Path], kind: str) -> None:
    if kind not in recordings:
        pytest.skip("ffmpeg not installed")
    stream = np.concatenate(list(iter_blocks(str(recordings[kind]), 10.0)))
    for start, end in [(0.0, 2.5), (12.345, 20.0), (60.0, 74.9)]:
        span = read_segment(str(recordings[kind]), start, end)
        ref = stream[round(start * SR): round(start * SR) + len(span)]
        assert len(span) == round((end - start) * SR)
        assert np.max(np.abs(span - ref)) < 2e-3 * max(1.0, float(np.max(np.abs(ref))))


def test_recording_info_reads_headers_only(recordings: dict[str, Path]) -> None:
    info = recording_info(str(recordings["flac"]))
    assert (info.sampling_rate, info.channels, info.reader) == (44_100, 2, "soundfile")
    assert info.duration_s == pytest.approx(75.0, abs=1e-3)
    if "mp3" in recordings:
        mp3 = recording_info(str(recordings["mp3"]))
        assert mp3.reader == "ffmpeg" and mp3.duration_s == pytest.approx(75.0, abs=0.1)


def test_not_audio_is_a_named_quarantine_reason(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 100)
    with pytest.raises(QuarantineError) as err:
        list(iter_blocks(str(text)))
    assert err.value.reason is ReasonCode.unreadable and "notes.wav" in err.value.message
    with pytest.raises(QuarantineError) as missing:
        list(iter_blocks(str(tmp_path / "gone.flac")))
    assert missing.value.reason is ReasonCode.missing_file


@pytest.mark.skipif(not silero_available(), reason="silero-vad not installed (models-cpu extra)")
def test_ids_identical_across_runs_and_block_sizes_and_mp3_close(recordings: dict[str, Path]) -> None:
    wav = str(recordings["wav"])
    first = segment_recording(wav, "rec", SegmentConfig(block_s=30.0))
    again = segment_recording(wav, "rec", SegmentConfig(block_s=30.0))
    other_blocks = segment_recording(wav, "rec", SegmentConfig(block_s=7.0))
    assert first and [s.id for s in first] == [s.id for s in again] == [s.id for s in other_blocks]
    assert all(2.0 <= s.duration_s <= 30.0 for s in first)
    if "mp3" in recordings:
        mp3 = segment_recording(str(recordings["mp3"]), "rec", SegmentConfig())
        assert len(mp3) == len(first)
        for a, b in zip(first, mp3, strict=True):
            assert abs(a.start_s - b.start_s) < 0.1 and abs(a.end_s - b.end_s) < 0.1
