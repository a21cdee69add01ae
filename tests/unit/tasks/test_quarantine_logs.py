"""Quarantine logging at scale: a line per clip for the first few of each reason, then counts only."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.generate import run_context  # imported before caplog: Prefect configures logging on import
from schemas.config import parse_config
from storage.objectstore import open_store
from tasks.llm import make_backend
from tasks.pipeline import process_shard
from tasks.plan import load_shard_plan, plan_run
from tasks.tally import QUARANTINE_LOG_PER_REASON
from tests.support.paths import REPO

SAMPLE = REPO / "examples" / "sample_corpus"


def test_only_the_first_clips_of_each_reason_get_a_line_each(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    missing = QUARANTINE_LOG_PER_REASON + 7
    shutil.copy(SAMPLE / "audio" / "arctic_slt_a0009.wav", tmp_path / "good.wav")
    manifest = tmp_path / "m.jsonl"
    with manifest.open("w") as f:
        f.write(json.dumps({"id": "good", "path": "good.wav", "transcript": "hello"}) + "\n")
        for i in range(missing):
            f.write(json.dumps({"id": f"gone{i:03d}", "path": f"gone{i:03d}.wav"}) + "\n")
        f.write(json.dumps({"id": "norow"}) + "\n")  # no audio path: one bad_row
    config = parse_config({"sources": [{"path": str(manifest), "dataset": "q"}],
                           "output": {"root": str(tmp_path / "out"), "dataset": "logs", "shard_size": 1000}},
                          environ={})
    ctx = run_context(config)
    store = open_store(str(tmp_path / "out"))
    plan = plan_run(config, store, ctx.staging, ctx.run_id)
    with caplog.at_level(logging.INFO, logger="speechpairs"):
        outcome = process_shard(load_shard_plan(store, ctx.staging, 0), config, store, ctx,
                                make_backend(config.llm))
    lines = [r.getMessage() for r in caplog.records if r.name == "speechpairs.pipeline"]
    per_clip = [m for m in lines if "quarantined at audio (missing_file)" in m]
    assert len(per_clip) == QUARANTINE_LOG_PER_REASON
    assert sum("quarantined at ingest (bad_row)" in m for m in lines) == 1  # each reason has its own budget
    (summary,) = [m for m in lines if "more quarantined clips not logged" in m]
    assert summary.startswith("shard 00000: 7 more quarantined clips not logged one by one (missing_file=7)")
    assert (outcome.rows, outcome.quarantined) == (1, missing + 1)
    assert plan.clips == outcome.rows + outcome.quarantined
    # Every clip is still in the quarantine Parquet, logged or not.
    assert outcome.quarantine is not None
    table = pq.read_table(tmp_path / "out" / outcome.quarantine.path)
    assert sorted(table.column("id").to_pylist()) == sorted(
        [f"q/gone{i:03d}" for i in range(missing)] + ["q/norow"])
