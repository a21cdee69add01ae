"""Planning by recording for every source kind (tasks/plan.py `audio_units`): corpus layouts weigh
their files by size and header, Common Voice reads its index once, lhotse weighs by its manifest's
durations without opening audio; `segment: never` and files over audio.max_file_bytes stay one unit."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from schemas.config import RunConfig, parse_config
from storage.objectstore import LocalStore
from tasks.ingest import iter_refs
from tasks.plan import audio_units, load_shard_plan, plan_run
from tests.support.paths import SAMPLE_CORPUS
from tests.support.speech import load_16k, trim_quiet

RATE = 8000  # 8 kHz PCM_16: 16 kB a second, so a 2 s clip (32 kB) stays under the 10 s WAV floor (40 kB)
CAP = 10.0  # audio.max_duration_s: one unit
# CREMA-D names in id order; seconds of real speech (sample clips tiled with pauses).
CREMA = {"1001_DFA_ANG_XX": 600.0, "1001_IEO_HAP_HI": 45.0, "1002_DFA_SAD_XX": 1.5, "1002_IEO_NEU_XX": 25.0,
         "1003_DFA_ANG_XX": 2.0, "1003_IEO_HAP_LO": 1.0, "1004_DFA_SAD_XX": 40.0, "1004_IEO_NEU_XX": 2.0,
         "1005_DFA_ANG_XX": 35.0}


def speech(seconds: float) -> np.ndarray:
    """`seconds` of the sample corpus's speech at RATE, clips joined by 0.4 s pauses (deterministic)."""
    clips = [trim_quiet(load_16k(p))[::2] for p in sorted((SAMPLE_CORPUS / "audio").glob("*.wav"))]
    pause = np.zeros(int(0.4 * RATE), np.float32)
    parts = list(itertools.chain.from_iterable((c, pause) for c in clips))
    total = np.concatenate(parts)
    n = round(seconds * RATE)
    return np.resize(total, n).astype(np.float32) if n > len(total) else total[:n]


def crema_corpus(root: Path) -> Path:
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoDemographics.csv").write_text("ActorID,Sex\n1001,Male\n1002,Female\n")
    for name, seconds in CREMA.items():
        sf.write(root / "AudioWAV" / f"{name}.wav", speech(seconds), RATE, subtype="PCM_16")
    return root


def config_for(source: Mapping[str, object], shard_size: int, audio: Mapping[str, object] | None = None,
               **extra: object) -> RunConfig:
    return parse_config({"sources": [dict(source)], "output": {"shard_size": shard_size},
                         "audio": {"max_duration_s": CAP, **(audio or {})}, **extra}, environ={})


def locators(config: RunConfig) -> list[tuple[int, str]]:
    return [(r.source, r.locator) for r in iter_refs(config.sources)]


def real_units(path: Path) -> float:
    """A file's planning weight from its decoded length: one unit up to CAP, else its length / CAP."""
    seconds = sf.info(path).frames / sf.info(path).samplerate
    return max(1.0, seconds / CAP)


def test_a_corpus_layout_is_planned_by_recording_balanced_by_audio_time(tmp_path: Path) -> None:
    root = crema_corpus(tmp_path / "crema")
    config = config_for({"path": str(root), "kind": "cremad", "dataset": "c"}, shard_size=6)  # budget 60 s
    units = audio_units(config, locators(config))
    long = {n for n, s in CREMA.items() if s > CAP}
    assert {loc.removeprefix("AudioWAV/").removesuffix(".wav") for _, loc in units} == long
    for (_, loc), weight in units.items():
        assert weight == pytest.approx(real_units(root / loc), abs=1e-6)
    store = LocalStore(tmp_path / "store")
    plan = plan_run(config, store, "c/_staging/r", "r")
    assert plan.long_recordings == len(long) == 5 and plan.clips == len(CREMA)
    shards = [[r.locator for r in load_shard_plan(store, "c/_staging/r", i).refs] for i in range(plan.shards)]
    weights = [[real_units(root / loc) for loc in shard] for shard in shards]
    assert ["AudioWAV/1001_DFA_ANG_XX.wav"] in shards  # 600 s: alone in its shard
    for i, shard in enumerate(weights):
        assert len(shard) == 1 or sum(shard) <= 6  # no shard of several clips over the 60 s budget
        if i + 1 < len(weights):  # a shard closed only when its next clip would not fit
            assert sum(shard) + weights[i + 1][0] > 6 or len(shard) == 6
    assert [len(s) for s in shards] == [1, 2, 3, 2, 1]  # by count alone: [6, 3]


def test_segment_never_and_oversized_files_stay_one_unit(tmp_path: Path) -> None:
    root = crema_corpus(tmp_path / "crema")
    source: dict[str, object] = {"path": str(root), "kind": "cremad", "dataset": "c"}
    never = config_for(source | {"segment": {"mode": "never"}}, shard_size=6)
    assert audio_units(never, locators(never)) == {}
    store = LocalStore(tmp_path / "store")
    plan = plan_run(never, store, "c/_staging/n", "n")
    assert plan.long_recordings == 0 and plan.shards == 2  # by count: 6 + 3
    # A file over audio.max_file_bytes is quarantined whole, never cut: not weighed as a recording.
    capped = config_for(source, shard_size=6, audio={"max_file_bytes": 2_000_000})
    weighed = {loc for _, loc in audio_units(capped, locators(capped))}
    assert "AudioWAV/1001_DFA_ANG_XX.wav" not in weighed and "AudioWAV/1001_IEO_HAP_HI.wav" in weighed


def test_common_voice_weighs_the_files_its_index_rows_name(tmp_path: Path) -> None:
    root = tmp_path / "cv" / "en"
    (root / "clips").mkdir(parents=True)
    rows = [("long_talk.flac", 120.0), ("short_a.wav", 2.0), ("mid_b.wav", 30.0)]
    for name, seconds in rows:
        sf.write(root / "clips" / name, speech(seconds), RATE, subtype="PCM_16")
    lines = ["client_id\tpath\tsentence"] + [f"spk{i}\t{name}\ttext {i}" for i, (name, _) in enumerate(rows)]
    (root / "validated.tsv").write_text("\n".join(lines) + "\n")
    config = config_for({"path": str(root), "kind": "commonvoice", "dataset": "cv"}, shard_size=4)
    refs = locators(config)
    units = audio_units(config, refs)
    header = len(lines[0]) + 1
    offsets = [header, header + len(lines[1]) + 1, header + len(lines[1]) + len(lines[2]) + 2]
    assert sorted(units) == [(0, f"validated.tsv:{offsets[0]}"), (0, f"validated.tsv:{offsets[2]}")]
    assert units[(0, f"validated.tsv:{offsets[0]}")] == pytest.approx(12.0)
    assert units[(0, f"validated.tsv:{offsets[2]}")] == pytest.approx(3.0)


def test_lhotse_weighs_whole_recordings_by_their_manifest_durations_without_audio(tmp_path: Path) -> None:
    """The audio files do not exist: the weights can only come from the manifest."""
    def rec(rid: str, seconds: float) -> dict[str, object]:
        return {"id": rid, "sources": [{"type": "file", "channels": [0], "source": f"/nowhere/{rid}.flac"}],
                "sampling_rate": 16000, "num_samples": int(seconds * 16000), "duration": seconds, "channel_ids": [0]}

    cuts = [
        {"id": "a-whole", "start": 0.0, "duration": 600.0, "channel": 0, "recording": rec("a", 600.0)},
        {"id": "b-part", "start": 30.0, "duration": 300.0, "channel": 0, "recording": rec("b", 900.0)},  # embedded
        {"id": "c-short", "start": 0.0, "duration": 4.0, "channel": 0, "recording": rec("c", 4.0)},
    ]
    manifest = tmp_path / "cuts_train.jsonl"
    manifest.write_text("".join(json.dumps(c) + "\n" for c in cuts))
    config = config_for({"path": str(manifest), "kind": "lhotse", "dataset": "l"}, shard_size=4)
    refs = locators(config)
    assert audio_units(config, refs) == {(0, "0@cuts_train.jsonl"): pytest.approx(60.0)}
    # Recordings with supervisions: only a supervision spanning its whole recording is weighed.
    folder = tmp_path / "rs"
    folder.mkdir()
    (folder / "recordings.jsonl").write_text(json.dumps(rec("r1", 200.0)) + "\n" + json.dumps(rec("r2", 50.0)) + "\n")
    sups = [{"id": "s1", "recording_id": "r1", "start": 0.0, "duration": 200.0, "channel": 0, "text": "x"},
            {"id": "s2", "recording_id": "r2", "start": 5.0, "duration": 20.0, "channel": 0, "text": "y"}]
    (folder / "supervisions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sups))
    config = config_for({"path": str(folder / "recordings.jsonl"), "kind": "lhotse", "dataset": "r"}, shard_size=4)
    units = audio_units(config, locators(config))
    assert units == {(0, "0@supervisions.jsonl|0@recordings.jsonl"): 20.0}
