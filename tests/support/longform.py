"""Long recordings with known utterance spans, built from real speech, and their timestamped sidecars.

A recording is real utterances (sample-corpus clips, or any (audio, text) pairs at 16 kHz) joined
with seeded silences, written as 16-bit WAV, so each utterance's span and words are known. Sidecars
are written by hand (SRT) or by a real tool (`ffmpeg_subtitles`: ffmpeg converts an SRT to WebVTT,
ASS, or back to SRT).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

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
