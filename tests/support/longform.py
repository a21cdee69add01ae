"""Long recordings with known utterance spans, built from real speech, and their timestamped sidecars.

A recording is real utterances (sample-corpus clips, or any (audio, text) pairs at 16 kHz) joined
with seeded silences, written as 16-bit WAV, so each utterance's span and words are known. Sidecars
are written by hand (SRT) or by a real tool (`ffmpeg_subtitles`: ffmpeg converts an SRT to WebVTT,
ASS, or back to SRT). `make_segmented_version` commits a version holding such a recording's
segments, for the consumer tests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flows.generate import run_plain
from schemas.config import parse_config
from tests.support.datasets_support import LocalVersion
from tests.support.paths import SAMPLE_CORPUS
from tests.support.speech import SR, load_16k, trim_quiet


@dataclass(frozen=True)
class Utterance:
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Recording:
    path: Path
    utterances: list[Utterance]
    samples: np.ndarray  # int16, as written


def sample_utterances() -> list[tuple[np.ndarray, str]]:
    """The sample corpus's lossless clips with a transcript, trimmed of leading/trailing quiet (16 kHz)."""
    out: list[tuple[np.ndarray, str]] = []
    for line in (SAMPLE_CORPUS / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("transcript") and row["path"].endswith((".wav", ".flac")):
            out.append((trim_quiet(load_16k(SAMPLE_CORPUS / row["path"])), row["transcript"]))
    return out


def build_recording(path: Path, utterances: list[tuple[np.ndarray, str]], seed: int, seconds: float) -> Recording:
    """Utterances in a seeded order with seeded silences of 0.8-1.6 s, until `seconds`; 16-bit WAV."""
    rng = np.random.default_rng(seed)
    parts, spans, t = [np.zeros(SR // 2, np.float32)], [], SR // 2
    while t < seconds * SR:
        audio, text = utterances[int(rng.integers(len(utterances)))]
        parts.append((audio * rng.uniform(0.6, 1.0)).astype(np.float32))
        spans.append(Utterance(t / SR, (t + len(audio)) / SR, text))
        t += len(audio)
        gap = int(rng.uniform(0.8, 1.6) * SR)
        parts.append(np.zeros(gap, np.float32))
        t += gap
    pcm = np.round(np.clip(np.concatenate(parts), -1, 1) * 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, pcm, SR, subtype="PCM_16")
    return Recording(path, spans, pcm)


def srt_clock(seconds: float, sep: str = ",") -> str:
    """`HH:MM:SS,mmm` (SRT; sep "." for WebVTT), rounded to the millisecond."""
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def write_srt(path: Path, rec: Recording) -> None:
    """One SRT cue per utterance, numbered from 1."""
    cues = [f"{i}\n{srt_clock(u.start_s)} --> {srt_clock(u.end_s)}\n{u.text}\n" for i, u in enumerate(rec.utterances, 1)]
    path.write_text("\n".join(cues), encoding="utf-8")


def ffmpeg_subtitles(source: Path, target: Path) -> Path:
    """`ffmpeg -i source target`: ffmpeg's own subtitle writer, picked by target's suffix (.vtt, .ass,
    .srt). Skips the test where ffmpeg is not installed."""
    binary = shutil.which("ffmpeg")
    if binary is None:
        pytest.skip("ffmpeg not installed (apt-get install ffmpeg)")
    subprocess.run([binary, "-nostdin", "-loglevel", "error", "-y", "-i", str(source), str(target)],
                   check=True, capture_output=True)
    return target


def words_inside(rec: Recording, start_s: float, end_s: float) -> str:
    """The texts of the utterances lying wholly inside [start_s, end_s], joined with spaces."""
    return " ".join(u.text for u in rec.utterances if start_s <= u.start_s and u.end_s <= end_s)


@dataclass(frozen=True)
class SegmentedVersion:
    """A committed version holding the segments of one long recording and one whole short clip."""

    local: LocalVersion
    recording: Recording  # its segments' ids are `<recording_id>@<start ms>-<end ms>`
    recording_id: str = "talks/rec"
    whole_id: str = "talks/short"


def make_segmented_version(work: Path) -> SegmentedVersion:
    """A ~40 s recording of sample clips (its only sidecar an ffmpeg-written WebVTT) and a 3 s sample
    clip in one folder source, run through the real stages (no Prefect): the recording is cut into
    2-12 s segments, the short clip stays whole."""
    folder = work / "talks"
    rec = build_recording(folder / "rec.wav", sample_utterances(), seed=5, seconds=40)
    write_srt(work / "rec.srt", rec)
    ffmpeg_subtitles(work / "rec.srt", folder / "rec.vtt")
    shutil.copy(SAMPLE_CORPUS / "audio" / "arctic_slt_a0009.wav", folder / "short.wav")
    root = work / "root"
    config = parse_config({"sources": [{"path": str(folder), "dataset": "talks", "language": "en"}],
                           "output": {"root": str(root), "dataset": "segmented", "shard_size": 3},
                           "segment": {"min_s": 2.0, "max_s": 12.0, "vad": "energy", "min_silence_s": 0.3},
                           "llm": {"backend": "rules"}})
    manifest = run_plain(config)
    return SegmentedVersion(LocalVersion(root, "segmented", manifest.lineage.version), rec)


def segment_span(row_id: str) -> tuple[float, float] | None:
    """(start_s, end_s) encoded in a segment id `<recording>@<ms>-<ms>`; None for a whole clip's id."""
    m = re.fullmatch(r".+@(\d+)-(\d+)", row_id)
    return (int(m[1]) / 1000, int(m[2]) / 1000) if m else None


def assert_recording_slice(audio: np.ndarray, rate: int, rec: Recording, offset_s: float, duration_s: float) -> None:
    """Float audio a consumer decoded from a row is the recording's samples from `offset_s` for
    `duration_s` (both stored at 16 kHz, 16-bit, lossless): equal to 1 LSB, or, where tasks/audio.py
    removed the clip's DC offset (one above 1% of its peak), less the slice's mean."""
    assert rate == SR
    pcm = np.round(np.asarray(audio, dtype=np.float64) * 32768).astype(np.int32)
    first = round(offset_s * SR)
    assert len(pcm) == round(duration_s * SR) and first + len(pcm) <= len(rec.samples)
    want = rec.samples[first:first + len(pcm)]
    diff = pcm - want
    shift = float(np.median(diff))
    assert np.ptp(diff) <= 1, (offset_s, np.ptp(diff))
    assert abs(shift) <= 1 or abs(shift + float(np.mean(want, dtype=np.float64))) <= 1, (offset_s, shift)
