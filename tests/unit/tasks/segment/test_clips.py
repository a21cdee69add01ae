"""Recordings → segment clips in the shard (tasks/segment/clips.py) and the `segment` config block."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from schemas.config import ConfigError, RunConfig, parse_config
from schemas.records import ReasonCode
from tasks.ingest import iter_refs
from tasks.segment.clips import shard_clips
from tasks.tally import ShardTally
from tests.support.paths import SAMPLE_CORPUS

SAMPLES = SAMPLE_CORPUS / "audio"
SR = 16_000


def test_a_config_without_segment_keeps_its_hash_and_means_auto() -> None:
    config = parse_config({"sources": [{"path": "/x"}]})
    assert config.config_hash() == "9e9b0d29190a9a22"  # the hash before the segment block existed
    assert config.segment_for(config.sources[0]).mode == "auto"
    # A lower clip cap lowers the implicit max_s (still valid); one too short for any segment: never.
    low = parse_config({"sources": [{"path": "/x"}], "audio": {"max_duration_s": 20.0}})
    assert (low.segment_for(low.sources[0]).mode, low.segment_for(low.sources[0]).max_s) == ("auto", 20.0)
    tiny = parse_config({"sources": [{"path": "/x"}], "audio": {"max_duration_s": 1.5, "min_duration_s": 0.5}})
    assert tiny.segment_for(tiny.sources[0]).mode == "never"
    explicit = parse_config({"sources": [{"path": "/x"}], "segment": {}})
    assert explicit.config_hash() != config.config_hash()
    assert explicit.segment_for(explicit.sources[0]).mode == "auto"


def test_source_override_wins_field_by_field() -> None:
    config = parse_config({"sources": [{"path": "/x", "segment": {"mode": "always"}}, {"path": "/y"}],
                           "segment": {"max_s": 20.0, "min_s": 3.0}})
    first, second = (config.segment_for(s) for s in config.sources)
    assert (first.mode, first.max_s, first.min_s) == ("always", 20.0, 3.0)
    assert (second.mode, second.max_s) == ("auto", 20.0)


@pytest.mark.parametrize(("data", "says"), [
    ({"segment": {"max_s": 40.0}}, "segment.max_s (40.0) must not exceed audio.max_duration_s (30.0)"),
    ({"sources": [{"path": "/x", "segment": {"max_s": 45.0}}], "audio": {"max_duration_s": 40.0}},
     "sources[0].segment.max_s (45.0) must not exceed audio.max_duration_s (40.0)"),
    ({"sources": [{"path": "/x", "segment": {"min_s": 31.0}}]}, "sources[0].segment"),
])
def test_segments_that_cannot_fit_are_refused_naming_the_key(data: dict, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"path": "/x"}]} | data)
    assert says in str(err.value)


def _config(manifest: Path, **segment: object) -> RunConfig:
    return parse_config({"sources": [{"path": str(manifest), "dataset": "d"}],
                         "segment": {"vad": "energy", **segment}})


def _clips(config: RunConfig) -> tuple[list, ShardTally]:
    acc = ShardTally()
    return list(shard_clips(sorted(iter_refs(config.sources), key=lambda r: r.id), config, acc)), acc


def test_a_long_recording_without_speech_is_one_no_speech_row(tmp_path: Path) -> None:
    sf.write(tmp_path / "hum.wav", np.zeros(40 * SR, np.float32), SR, subtype="PCM_16")  # 40 s of silence
    shutil.copy(SAMPLES / "arctic_slt_a0009.wav", tmp_path / "short.wav")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "hum", "path": "hum.wav"}) + "\n"
                                      + json.dumps({"id": "short", "path": "short.wav"}) + "\n")
    clips, acc = _clips(_config(tmp_path / "m.jsonl"))
    assert [c.id for c in clips] == ["d/short"]  # the 3 s clip stays whole: no offset, no embedded audio
    assert clips[0].offset_s is None and clips[0].audio_bytes is None
    assert [(q.id, q.reason_code) for q in acc.quarantine] == [("d/hum", ReasonCode.no_speech)]
    assert "segment.min_s" in acc.quarantine[0].message
    assert (acc.refs_done, acc.recordings_cut, acc.segments) == (2, 0, 0)


def test_mode_always_cuts_a_short_clip_and_a_bad_sidecar_names_its_line(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "librivox_ss01_0870.wav", tmp_path / "a.wav")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "path": "a.wav", "timestamps": "a.srt"}) + "\n")
    (tmp_path / "a.srt").write_text("1\n00:00:00,100 --> 00:00:06,900\nand mister john dashwood\n")
    clips, acc = _clips(_config(tmp_path / "m.jsonl", mode="always"))
    assert len(clips) == 1 and clips[0].id.startswith("d/a@") and clips[0].transcript == "and mister john dashwood"
    start, end = (int(x) / 1000 for x in clips[0].id.split("@")[1].split("-"))
    assert clips[0].offset_s == pytest.approx(start) and clips[0].audio_bytes is not None
    assert sf.info(io.BytesIO(clips[0].audio_bytes)).duration == pytest.approx(end - start, abs=1e-3)
    assert (acc.refs_done, acc.recordings_cut, acc.segments) == (1, 1, 1)
    (tmp_path / "a.srt").write_text("1\n00:00:00,100 --> nonsense\nwords\n")
    clips, acc = _clips(_config(tmp_path / "m.jsonl", mode="always"))
    assert clips == [] and [q.reason_code for q in acc.quarantine] == [ReasonCode.bad_row]
    assert "a.srt" in acc.quarantine[0].message and "fix or remove that file" in acc.quarantine[0].message


def test_a_timestamps_file_outside_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    shutil.copy(SAMPLES / "arctic_slt_a0009.wav", tmp_path / "corpus" / "a.wav")
    (tmp_path / "secret.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nx\n")
    manifest = tmp_path / "corpus" / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "path": "a.wav", "timestamps": "../secret.srt"}) + "\n")
    clips, _ = _clips(_config(manifest, mode="always"))
    assert len(clips) == 1 and clips[0].ingest_error is not None
    reason, message = clips[0].ingest_error
    assert reason is ReasonCode.path_outside_root and "secret.srt" in message
