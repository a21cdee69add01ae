"""Shard planning: sorted stable ids cut into fixed-size shards, recorded once per run in staging.

The plan is written before any shard runs and reused on every re-run of the same run id, so a
resumed run never re-partitions (a peer's classic mistake: checkpoints that no longer match).
Only light `ClipRef`s are held while sorting, never whole records or audio.
"""

from __future__ import annotations

import json
from datetime import datetime

from pydantic import BaseModel, Field

from schemas.config import RunConfig
from schemas.records import utc_now
from storage.objectstore import NotFound, ObjectStore, PreconditionFailed
from tasks.ingest import ClipRef, SourceError, iter_refs

PLAN_FORMAT = "speechpairs/plan@1"


class RunPlan(BaseModel):
    format: str = PLAN_FORMAT
    run_id: str
    config_hash: str
    clips: int
    shards: int
    shard_size: int
    duplicates: int = 0
    created_at: datetime = Field(default_factory=utc_now)


class ShardPlan(BaseModel):
    index: int
    of: int
    refs: list[ClipRef]


def plan_key(prefix: str) -> str:
    return f"{prefix}/plan.json"


def shard_plan_key(prefix: str, index: int) -> str:
    return f"{prefix}/plan/shard-{index:05d}.json"


def plan_run(config: RunConfig, store: ObjectStore, prefix: str, run_id: str) -> RunPlan:
    """Load the run's plan if it exists, else make it: shard files first, plan.json last."""
    existing = load_plan(store, prefix)
    if existing is not None:
        return existing
    # Ties (duplicate ids) keep source order: manifest offsets compare as numbers, not strings.
    refs = sorted(iter_refs(config.sources),
                  key=lambda r: (r.id, r.source, int(r.locator) if r.locator.isdigit() else -1, r.locator))
    if not refs:
        raise SourceError("the sources list no clips: " + ", ".join(s.path for s in config.sources)
                          + "; check the paths and that folders hold wav/flac/mp3/ogg files")
    duplicates = 0
    for i in range(1, len(refs)):
        if refs[i].id == refs[i - 1].id:
            refs[i] = refs[i].model_copy(update={"duplicate": True})
            duplicates += 1
    size = config.output.shard_size
    count = (len(refs) + size - 1) // size
    for index in range(count):
        shard = ShardPlan(index=index, of=count, refs=refs[index * size:(index + 1) * size])
        store.put_bytes(shard_plan_key(prefix, index), shard.model_dump_json().encode())
    plan = RunPlan(run_id=run_id, config_hash=config.config_hash(), clips=len(refs), shards=count,
                   shard_size=size, duplicates=duplicates)
    try:
        store.put_bytes(plan_key(prefix), plan.model_dump_json(indent=2).encode(), if_none_match=True)
    except PreconditionFailed:
        # Another launcher of the same run planned concurrently: the first plan wins, for both.
        winner = load_plan(store, prefix)
        assert winner is not None
        return winner
    return plan


def load_plan(store: ObjectStore, prefix: str) -> RunPlan | None:
    try:
        return RunPlan.model_validate(json.loads(store.get_bytes(plan_key(prefix))))
    except NotFound:
        return None


def load_shard_plan(store: ObjectStore, prefix: str, index: int) -> ShardPlan:
    return ShardPlan.model_validate(json.loads(store.get_bytes(shard_plan_key(prefix, index))))
