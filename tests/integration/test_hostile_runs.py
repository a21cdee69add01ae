"""Hostile text and non-speech sources through whole runs (Prefect API): what reaches the rows, the
prompt and the quarantine."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flows.generate import run_generate
from schemas.config import parse_config
from storage.reader import open_dataset
from tests.support.corrupt_zoo import (
    CHAT_TOKEN,
    EXPECTED_SEEDS,
    FULLWIDTH_TRANSCRIPT,
    INJECTED_ACCENT,
    build_zoo,
)
from tests.support.datasets_support import quarantine_rows
from tests.support.speech import SR

SLT = "arctic_slt_a0009.wav"


def _rows(root: Path, dataset: str, version: str) -> list[dict]:
    table = open_dataset(f"{root}/{dataset}@{version}").to_arrow()
    return table.to_pylist()


@pytest.mark.usefixtures("prefect_harness")
def test_zoo_hostile_cases_end_to_end(tmp_path: Path, sample_corpus: Path) -> None:
    manifest, expected = build_zoo(tmp_path / "zoo", sample_corpus)
    config = parse_config({"sources": [{"path": str(manifest), "dataset": "zoo", "language": "en"}],
                           "output": {"root": str(tmp_path / "out"), "dataset": "zoo", "shard_size": 8}},
                          environ={})
    summary = run_generate(config)
    assert summary.clips_in == len(expected) + 1 == summary.rows + summary.quarantined
    quarantine = quarantine_rows(tmp_path / "out", "zoo", summary.version)
    got = {q["id"].split("/", 1)[1]: (q["stage"], q["reason_code"]) for q in quarantine}
    assert got["dc_offset"] == ("audio", "silent")
    assert got["click_in_silence"] == ("audio", "no_speech")
    assert got["float_1e30"] == ("audio", "out_of_range")
    assert got["huge_transcript"] == ("ingest", "transcript_too_long")
    rows = {r["id"].split("/", 1)[1]: r for r in _rows(tmp_path / "out", "zoo", summary.version)}
    assert {"speech_dc_offset", "float_over_full_scale", "injected_labels", "fullwidth_tokens"} <= set(rows)
    for clip_id, seed in EXPECTED_SEEDS.items():
        row = rows[clip_id]
        assert row["seed_description"] == seed
        spoken, listed = seed.split(" (Gender: Female, ")
        assert seed.count("[") == 1 and not re.search(r"[A-Za-z]\s*:", spoken)  # no forged span or label pair
        assert listed.endswith(")") and "(" not in listed and ")" not in listed[:-1]  # one list, not closed early
        assert row["messages"][-1]["content"] == f"{seed}\nWhat can you hear from the audio?"
        for message in row["messages"]:
            assert not CHAT_TOKEN.search(message["content"]), message
        assert not CHAT_TOKEN.search(row["response"]) and "[" not in row["response"]
    assert json.loads(rows["injected_labels"]["labels"])["accent"] == INJECTED_ACCENT  # the row keeps it verbatim
    assert rows["fullwidth_tokens"]["transcript"] == FULLWIDTH_TRANSCRIPT
    assert rows["speech_dc_offset"]["features"]["rms_dbfs"] < -15  # measured without the 0.3 offset (-10 dBFS)


@pytest.mark.usefixtures("prefect_harness")
def test_non_speech_source_keeps_labels_only_seeds(tmp_path: Path, sample_corpus: Path) -> None:
    audio = tmp_path / "audio"
    audio.mkdir()
    shutil.copy(sample_corpus / "audio" / SLT, audio / SLT)
    click = np.zeros(2 * SR, dtype=np.float32)
    click[SR] = 0.9
    sf.write(audio / "click.wav", click, SR)
    rng = np.random.default_rng(3)
    bark = np.zeros(2 * SR, dtype=np.float32)
    t = np.arange(SR // 5) / SR
    for start in (0.3, 1.1):  # two 200 ms barks: harmonic bursts over noise
        i = int(start * SR)
        bark[i:i + len(t)] = 0.5 * np.sin(2 * np.pi * 450 * t) * np.hanning(len(t))
    bark += 0.002 * rng.standard_normal(len(bark)).astype(np.float32)
    sf.write(audio / "bark.wav", bark, SR)
    speech = tmp_path / "speech.jsonl"
    speech.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "slt", "path": f"audio/{SLT}", "transcript": "he turned sharply", "gender": "female"},
        {"id": "click", "path": "audio/click.wav", "transcript": "a click"}]))
    sounds = tmp_path / "sounds.jsonl"
    sounds.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "click", "path": "audio/click.wav", "category": "click"},
        {"id": "bark", "path": "audio/bark.wav", "transcript": "woof woof", "category": "dog"}]))
    config = parse_config({"sources": [{"path": str(speech), "dataset": "talk"},
                                       {"path": str(sounds), "dataset": "sfx", "speech": False,
                                        "seed_labels": ["category"]}],
                           "output": {"root": str(tmp_path / "out"), "dataset": "mixed"}}, environ={})
    summary = run_generate(config)
    assert (summary.clips_in, summary.rows, summary.quarantined) == (4, 3, 1)
    assert summary.quarantine_by_reason == {"no_speech": 1}
    quarantine = quarantine_rows(tmp_path / "out", "mixed", summary.version)
    assert [q["id"] for q in quarantine] == ["talk/click"]  # the same file under the speech source
    rows = {r["id"]: r for r in _rows(tmp_path / "out", "mixed", summary.version)}
    assert rows["talk/slt"]["seed_description"].startswith("[00:00-00:03] he turned sharply (Gender: Female, ")
    for clip_id, category in (("sfx/click", "click"), ("sfx/bark", "dog")):
        seed = rows[clip_id]["seed_description"]
        assert re.fullmatch(r"\[00:00-00:02\] \((?:[A-Z][a-z ]+: [A-Za-z ]+, )*Category: " + category + r"\)", seed), seed
        for voice in ("Pitch", "Speaking speed", "Gender", "woof"):
            assert voice not in seed, (clip_id, seed)
        features = rows[clip_id]["features"]
        assert features["pitch_mean_hz"] is None and features["speaking_rate_wps"] is None
    assert rows["sfx/bark"]["transcript"] == "woof woof"  # kept verbatim in the row, never in the prompt
    assert "woof" not in rows["sfx/bark"]["response"]
