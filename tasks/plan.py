"""Shard planning: sorted stable ids cut into fixed-size shards, recorded once per run in staging.

The plan is written before any shard runs and reused on every re-run of the same run id, so a
resumed run never re-partitions (checkpoints would no longer match).
Only light `ClipRef`s are held while sorting, never whole records or audio.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime

from pydantic import BaseModel, Field

from schemas.config import RunConfig
from schemas.records import utc_now
from storage.layout import RunLayout
from storage.objectstore import NotFound, ObjectStore, PreconditionFailed
from tasks.ingest import ClipRef, SourceError, iter_refs, source_kind
from tasks.ingest.common import AUDIO_SUFFIXES, PROBLEM
from tasks.ingest.folder import skipped_files

PLAN_FORMAT = "speechpairs/plan@1"


class RunPlan(BaseModel):
    format: str = PLAN_FORMAT
    run_id: str
    config_hash: str
    clips: int
    shards: int
    shard_size: int
    duplicates: int = 0
    # Folder sources' files that are not audio (nor .txt/.lab sidecars), by extension: reported, not clips.
    skipped_files: dict[str, int] = Field(default_factory=dict)
    # Folders a walk could not enter (unreadable, a link loop, a link outside the roots), by reason:
    # each is also one quarantine row `<dataset>/<relative dir>/` (counted in `clips`).
    unentered_folders: dict[str, int] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utc_now)


class ShardPlan(BaseModel):
    index: int
    of: int
    refs: list[ClipRef]
    created_at: datetime | None = None  # the run's planned-at time (None in plans from before it existed)


def plan_run(config: RunConfig, store: ObjectStore, prefix: str, run_id: str) -> RunPlan:
    """Load the run's plan if it exists, else make it: shard files first, plan.json last."""
    existing = load_plan(store, prefix)
    if existing is not None:
        return existing
    # Plain tuples while sorting, not models (memory: docs/decisions.md); ties (duplicate ids) keep
    # source order, clip-list row offsets compared as numbers, not as text.
    keys = sorted((r.id, r.source, int(r.locator) if r.locator.isdigit() else -1, r.locator)
                  for r in iter_refs(config.sources))
    skipped = count_skipped_files(config)
    if not keys:
        raise SourceError("the sources list no clips: " + ", ".join(s.path for s in config.sources)
                          + f"; check the paths and that folders hold audio ({' '.join(AUDIO_SUFFIXES)})"
                          + (f"; skipped non-audio files: {skipped_text(skipped)}" if skipped else ""))
    is_dup = [i > 0 and keys[i][0] == keys[i - 1][0] for i in range(len(keys))]
    size = config.output.shard_size
    count = (len(keys) + size - 1) // size
    planned_at = utc_now()
    for index in range(count):
        start = index * size
        refs = [ClipRef(id=k[0], source=k[1], locator=k[3], duplicate=is_dup[start + j])
                for j, k in enumerate(keys[start:start + size])]
        shard = ShardPlan(index=index, of=count, refs=refs, created_at=planned_at)
        store.put_bytes(RunLayout(prefix).shard_plan(index), shard.model_dump_json().encode())
    unentered = Counter(k[3].split(PROBLEM, 2)[1] for k in keys if k[3].startswith(PROBLEM) and k[0].endswith("/"))
    plan = RunPlan(run_id=run_id, config_hash=config.config_hash(), clips=len(keys), shards=count,
                   shard_size=size, duplicates=sum(is_dup), skipped_files=skipped, created_at=planned_at,
                   unentered_folders=dict(sorted(unentered.items(), key=lambda kv: (-kv[1], kv[0]))))
    try:
        store.put_bytes(RunLayout(prefix).plan, plan.model_dump_json(indent=2).encode(), if_none_match=True)
    except PreconditionFailed:
        # Another launcher of the same run planned concurrently: the first plan wins, for both.
        winner = load_plan(store, prefix)
        assert winner is not None
        return winner
    return plan


def count_skipped_files(config: RunConfig) -> dict[str, int]:
    """Extension → count of the files folder sources leave out, most frequent first.

    A second listing of each folder (the ref walk stays the adapters' own); listing is cheap next
    to the per-file stat the source fingerprint already does. An s3:// folder: one listing too.
    """
    counts: Counter[str] = Counter()
    for source in config.sources:
        if source_kind(source) == "folder":
            counts.update(skipped_files(source.path))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def skipped_text(counts: dict[str, int]) -> str:
    """`3 (.pdf=2, .docx=1)`: the run summary's line for files a folder source skipped (and, by
    reason, for folders a walk could not enter)."""
    total = sum(counts.values())
    return f"{total} ({', '.join(f'{ext}={n}' for ext, n in counts.items())})" if total else "0"


def load_plan(store: ObjectStore, prefix: str) -> RunPlan | None:
    try:
        return RunPlan.model_validate(json.loads(store.get_bytes(RunLayout(prefix).plan)))
    except NotFound:
        return None


def load_shard_plan(store: ObjectStore, prefix: str, index: int) -> ShardPlan:
    return ShardPlan.model_validate(json.loads(store.get_bytes(RunLayout(prefix).shard_plan(index))))
