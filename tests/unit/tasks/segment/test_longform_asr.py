"""Segments of a long recording without timed text get their words from Whisper (issue 14 part 3).

A real run (`run_plain`, `rules` backend) over two recordings built from espeak-ng sentences with
known silences: rec_a has an SRT sidecar, rec_b has none. With features.asr enabled (a micro
random-weight Whisper built here: its words are garbage, but they are the model's words for that
audio) every rec_b segment is transcribed once, from its own samples, and rec_a's segments keep
their sidecar words without reaching Whisper; with asr off rec_b's segments get labels-only seeds,
counted in the version's `rows_without_transcript`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from flows.generate import run_plain
from schemas.config import RunConfig, parse_config
from schemas.manifest import Manifest
from storage.objectstore import open_store
from tests.support.longform import build_recording, words_inside, write_srt
from tests.support.speech import SENTENCES, SR, trim_quiet
from tests.support.stored import stored_rows
from tests.support.tiny_models import build_micro_whisper

pytest.importorskip("whisper")
from tasks.features import asr  # after the importorskip: needs openai-whisper
from tasks.features.asr import ASRResult, Transcriber

ID = re.compile(r"^(?P<rec>.+)@(?P<start>\d+)-(?P<end>\d+)$")
PERMISSIVE = {"no_speech_threshold": 1.0, "logprob_threshold": -1000, "compression_ratio_threshold": 1000}
SAMPLE_LEN = 8  # tokens decoded per segment: the micro model's 224-token default is slow on a shared CPU


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, espeak: Callable[..., np.ndarray]) -> dict[str, Any]:
    """talks/rec_a.wav + rec_a.srt and talks/rec_b.wav (no sidecar), about 12 s each: one segment
    per sentence under the config below; and the micro Whisper checkpoint."""
    root = tmp_path_factory.mktemp("longform_asr")
    sentences = [(trim_quiet(espeak("-s", "170", text=text)), text) for text in SENTENCES]
    rec_a = build_recording(root / "talks" / "rec_a.wav", sentences, seed=5, seconds=12)
    write_srt(root / "talks" / "rec_a.srt", rec_a)
    rec_b = build_recording(root / "talks" / "rec_b.wav", sentences, seed=6, seconds=12)
    return {"root": root, "rec_a": rec_a, "rec_b": rec_b, "whisper": build_micro_whisper(root / "micro.pt")}


def _config(corpus: dict[str, Any], out: Path, asr: bool) -> RunConfig:
    return parse_config({
        "sources": [{"path": str(corpus["root"] / "talks"), "dataset": "talks", "language": "en",
                     "segment": {"mode": "always"}}],
        "output": {"root": str(out), "dataset": "asr", "shard_size": 2},
        "segment": {"min_s": 1.0, "max_s": 6.0, "vad": "energy", "min_silence_s": 0.3},
        "features": {"asr": {"enabled": asr, "model": str(corpus["whisper"]), "device": "cpu", "language": "en",
                                      **PERMISSIVE}},
        "llm": {"backend": "rules"},
    })


def _rows(out: Path, manifest: Manifest) -> dict[str, dict[str, Any]]:
    return stored_rows(open_store(str(out)), manifest)


class TranscribeSpy:
    """Records what Whisper was given (each clip's samples) and what it said, calling the real model."""

    def __init__(self) -> None:
        self.heard: list[tuple[np.ndarray, str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = Transcriber.transcribe
        load = asr.load_transcriber
        monkeypatch.setattr(asr, "load_transcriber", lambda config, **_: load(config, sample_len=SAMPLE_LEN))

        def transcribe(tr: Transcriber, audios: Sequence[np.ndarray]) -> list[Any]:
            results = real(tr, audios)
            for audio, result in zip(audios, results, strict=True):
                assert isinstance(result, ASRResult), result  # permissive thresholds: nothing refused
                self.heard.append((np.asarray(audio).copy(), result.text))
            return results

        monkeypatch.setattr(Transcriber, "transcribe", transcribe)


def _segments(rows: dict[str, dict[str, Any]], rec: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows.values() if r["id"].startswith(f"talks/{rec}@")),
                  key=lambda r: int(ID.match(r["id"])["start"]))  # type: ignore[index]


def _pcm(row: dict[str, Any]) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
    assert rate == SR
    return audio


def test_whisper_transcribes_each_segment_without_timed_text(corpus: dict[str, Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spy = TranscribeSpy()
    spy.install(monkeypatch)
    manifest = run_plain(_config(corpus, tmp_path, asr=True))
    rows = _rows(tmp_path, manifest)
    a_rows, b_rows = _segments(rows, "rec_a"), _segments(rows, "rec_b")
    assert a_rows and len(b_rows) >= 2
    assert manifest.stats.recordings_cut == 2 and manifest.stats.quarantined == 0
    # Whisper heard rec_b's segments only, each once: the samples each row carries (16-bit in the row).
    assert len(spy.heard) == len(b_rows)
    for row in b_rows:
        pcm = _pcm(row)
        heard = [text for audio, text in spy.heard
                 if len(audio) == len(pcm) and np.max(np.abs(audio - pcm)) <= 1.5 / 32768]
        assert len(heard) == 1, (row["id"], [len(a) for a, _ in spy.heard], len(pcm))
        assert row["transcript_source"] == f"whisper:{corpus['whisper']}", row["id"]
        assert row["transcript"] == heard[0].strip() and row["transcript"], row["id"]
    for row in a_rows:  # the sidecar's words inside the segment's span; never Whisper's
        start, end = (int(ID.match(row["id"])[k]) / 1000 for k in ("start", "end"))  # type: ignore[index]
        assert row["transcript_source"] == "corpus" and row["transcript"] == words_inside(corpus["rec_a"], start, end)
        assert not any(len(audio) == len(_pcm(row)) for audio, _ in spy.heard), row["id"]
    assert manifest.stats.rows_without_transcript == 0


def test_without_asr_the_segments_get_labels_only_seeds_counted(corpus: dict[str, Any], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spy = TranscribeSpy()
    spy.install(monkeypatch)
    manifest = run_plain(_config(corpus, tmp_path, asr=False))
    rows = _rows(tmp_path, manifest)
    b_rows = _segments(rows, "rec_b")
    assert spy.heard == []
    assert len(b_rows) >= 2
    assert all(r["transcript"] is None and r["transcript_source"] is None for r in b_rows)
    assert all(r["transcript_source"] == "corpus" for r in _segments(rows, "rec_a"))
    assert manifest.stats.rows_without_transcript == len(b_rows)
