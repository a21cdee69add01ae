import json
from pathlib import Path

import pytest

from schemas.config import RunConfig, parse_config
from storage.objectstore import LocalStore
from tasks.ingest import SourceError
from tasks.plan import load_plan, load_shard_plan, plan_run


def _config(manifest: Path, shard_size: int) -> RunConfig:
    return parse_config({"sources": [{"path": str(manifest), "dataset": "p"}],
                         "output": {"shard_size": shard_size}}, environ={})


def test_plan_sorts_ids_into_contiguous_shards_once(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    ids = [f"u{(i * 7919) % 2503:05d}" for i in range(2503)]  # a permutation, unsorted
    manifest.write_text("".join(json.dumps({"id": i, "path": f"{i}.wav"}) + "\n" for i in ids))
    store = LocalStore(tmp_path / "root")
    plan = plan_run(_config(manifest, 1000), store, "p/_staging/r", "r")
    assert (plan.clips, plan.shards, plan.duplicates) == (2503, 3, 0)
    shards = [load_shard_plan(store, "p/_staging/r", i) for i in range(plan.shards)]
    assert [len(s.refs) for s in shards] == [1000, 1000, 503]
    flat = [r.id for s in shards for r in s.refs]
    assert flat == sorted(f"p/{i}" for i in ids)
    # The plan is recorded: a later launch of the same run reuses it even if the source moved on.
    manifest.write_text(manifest.read_text() + json.dumps({"id": "late", "path": "late.wav"}) + "\n")
    again = plan_run(_config(manifest, 10), store, "p/_staging/r", "r")
    assert again == plan == load_plan(store, "p/_staging/r")


def test_empty_source_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(SourceError, match="the sources list no clips"):
        plan_run(_config(tmp_path / "m.jsonl", 10), LocalStore(tmp_path / "root"), "p/_staging/r", "r")
