"""Planning by audio time (tasks/plan.py): long recordings are balanced across shards by duration."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from schemas.config import RunConfig, parse_config
from storage.objectstore import LocalStore
from tasks.plan import audio_units, load_shard_plan, plan_run, shard_bounds

RATE = 8000  # PCM_U8 at 8 kHz: 8000 bytes per second, over the WAV size floor (4000 B/s)
DURATIONS = [10, 60, 600, 20, 90, 45, 300, 15, 120, 5, 240, 30]  # seconds, in id order r00..r11


def _corpus(tmp_path: Path, durations: list[int]) -> Path:
    folder = tmp_path / "talks"
    folder.mkdir()
    for i, seconds in enumerate(durations):
        sf.write(folder / f"r{i:02d}.wav", np.zeros(seconds * RATE, dtype=np.float32), RATE, subtype="PCM_U8")
    return folder


def _config(folder: Path, shard_size: int, **extra: object) -> RunConfig:
    return parse_config({"sources": [{"path": str(folder), "dataset": "t"}],
                         "output": {"shard_size": shard_size}, **extra}, environ={})


def _shard_audio(store: LocalStore, prefix: str, shards: int) -> tuple[list[list[str]], list[int]]:
    ids = [[r.id for r in load_shard_plan(store, prefix, i).refs] for i in range(shards)]
    # Planned audio: a clip that cannot be long counts as a full one (30 s), unweighed.
    return ids, [sum(max(30, DURATIONS[int(i[-2:])]) for i in shard) for shard in ids]


def test_recordings_are_balanced_by_audio_time(tmp_path: Path) -> None:
    folder = _corpus(tmp_path, DURATIONS)
    config = _config(folder, 20)  # budget: 20 clips x 30 s = 600 s of audio per shard
    store = LocalStore(tmp_path / "root")
    plan = plan_run(config, store, "t/_staging/r", "r")
    # 10, 20, 15, 5 and 30 s cannot be long: one unit each, unweighed; the other seven are weighed.
    assert plan.long_recordings == 7 and plan.clips == 12
    ids, audio = _shard_audio(store, "t/_staging/r", plan.shards)
    assert [i for shard in ids for i in shard] == [f"t/r{i:02d}" for i in range(12)]  # sorted, contiguous
    # Budget 600 s, no recording over it: no shard over 600 s, and any two neighbours together
    # exceed it (else the second's first clip would have joined the first), so the shards before
    # the last average over 300 s: max / mean < 2.
    assert max(audio) <= 600
    assert all(a + b > 600 for a, b in itertools.pairwise(audio))
    full = audio[:-1]
    assert max(full) / (sum(full) / len(full)) < 2
    # By count alone (shard_size 20) all 1605 s would sit in one shard.
    assert plan.shards == 4 and audio == [90, 600, 495, 420] and sum(audio) == 1605
    # The same corpus plans the same shards (another run id, another staging area).
    again = plan_run(config, store, "t/_staging/r2", "r2")
    assert (again.shards, _shard_audio(store, "t/_staging/r2", again.shards)[0]) == (plan.shards, ids)


def test_a_recording_over_the_budget_sits_alone_and_never_mode_plans_by_count(tmp_path: Path) -> None:
    folder = _corpus(tmp_path, DURATIONS)
    store = LocalStore(tmp_path / "root")
    plan = plan_run(_config(folder, 4), store, "t/_staging/a", "a")  # budget 120 s
    ids, audio = _shard_audio(store, "t/_staging/a", plan.shards)
    assert ["t/r02"] in ids and ["t/r06"] in ids  # 600 s and 300 s: alone, a shard holds >= 1 clip
    assert all(a <= 120 for shard, a in zip(ids, audio, strict=True) if len(shard) > 1)
    never = plan_run(_config(folder, 4, segment={"mode": "never"}), store, "t/_staging/n", "n")
    assert never.long_recordings == 0
    assert [len(load_shard_plan(store, "t/_staging/n", i).refs) for i in range(never.shards)] == [4, 4, 4]


def test_short_clips_cost_no_header_read_and_plan_by_count(tmp_path: Path, monkeypatch) -> None:
    manifest = tmp_path / "m.jsonl"
    (tmp_path / "a").mkdir()
    rows = []
    for i in range(7):
        sf.write(tmp_path / "a" / f"c{i}.wav", np.zeros(3 * 16000, dtype=np.float32), 16000)  # 3 s, 96 KB
        rows.append({"id": f"c{i}", "path": f"a/c{i}.wav"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = parse_config({"sources": [{"path": str(manifest), "dataset": "m"}], "output": {"shard_size": 3}},
                          environ={})

    def no_header(*_: object) -> None:
        raise AssertionError("a header was read for a clip that cannot be long")

    monkeypatch.setattr("soundfile.info", no_header)
    assert audio_units(config, [(0, str(o)) for o in range(7)]) == {}
    store = LocalStore(tmp_path / "root")
    plan = plan_run(config, store, "m/_staging/r", "r")
    assert [len(load_shard_plan(store, "m/_staging/r", i).refs) for i in range(plan.shards)] == [3, 3, 1]


def test_shard_bounds_cut_by_count_without_weights_and_by_units_with_them() -> None:
    assert shard_bounds(None, 7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert shard_bounds([1.0] * 7, 7, 3) == [(0, 3), (3, 6), (6, 7)]  # unit weights: the same cuts
    assert shard_bounds([1.0, 5.0, 1.0, 1.0, 2.5], 5, 3) == [(0, 1), (1, 2), (2, 4), (4, 5)]
