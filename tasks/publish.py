"""Turning a finished run into a version, or refusing to: the commit gate's verdict, the stats, the
commit itself, and what the run's staging area records about it (refused.json, committed.json).

With `output.base` the version also references a base version's shards (storage/compose.py).
A run commits once: a retried or re-launched commit finds the version it already published (its
committed.json, or the latest version manifest naming its run id) instead of publishing twice.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from schemas.arrow import ROW_SCHEMA, hf_features, schema_to_b64
from schemas.canonical import config_record
from schemas.config import RunConfig
from schemas.manifest import Manifest, Stats
from storage.compose import Part, common_schema, load_part, merge_stats, on_base
from storage.layout import is_data_key
from storage.objectstore import NotFound, ObjectStore
from storage.versions import (
    LAYOUT_DATA_KEYS,
    CommitError,
    VersionNotFound,
    commit_version,
    read_manifest,
    resolve_version,
)
from tasks.commit_gate import CommitRefused, QuarantineExample, Refusal, check_commit
from tasks.features.models import load_models
from tasks.instructions import instruction_pool, pool_hash
from tasks.llm import make_backend
from tasks.pipeline import ShardOutcome, finished_outcome
from tasks.plan import RunPlan, load_plan
from tasks.run import RunContext, run_context, run_store


def publish(config: RunConfig, ctx: RunContext, plan: RunPlan, outcomes: list[ShardOutcome],
            flow_run_id: str | None = None) -> Manifest:
    """Commit the run's staged shards as the next version (or find the one it already published)."""
    store = run_store(config)
    stats = combine_stats(plan, outcomes)
    landed = manifest_of_run(store, config.output.dataset, ctx.run_id)
    if landed is not None:
        # An earlier attempt published the version manifest but died before recording it: don't publish twice.
        store.put_bytes(ctx.layout.committed, json.dumps({"version": landed.lineage.version}).encode())
        return landed
    backend = make_backend(config.llm)
    model = backend.model_info()
    lineage: dict[str, Any] = {
        "flow_run_id": flow_run_id,
        "run_id": ctx.run_id,
        "code_version": ctx.pipeline_version,
        "config_hash": ctx.config_hash,
        "bins_version": ctx.bins_version,
        "models": [{"role": "llm", "name": model.get("name") or backend.name, "revision": model.get("revision")},
                   *load_models(config.features).infos()],
        "sampling": {"backend": backend.name, "temperature": config.llm.temperature, "top_p": config.llm.top_p,
                     "max_tokens": config.llm.max_tokens, "seed": config.llm.seed},
        "prompt_pool_hash": pool_hash(instruction_pool(config.describe)),
        "extractor_versions": ctx.extractor_versions,
    }
    shards = [o.shard for o in outcomes if o.shard is not None]
    quarantine = [o.quarantine for o in outcomes if o.quarantine is not None]
    layout = None
    base = base_part(store, config)
    if base is not None:  # output.base: the base's other corpora referenced, this run's replaced
        if not all(is_data_key(s.path) for s in [*shards, *quarantine]):
            raise CommitError("output.base needs shards at data keys; this run was staged by an older "
                              "speechpairs: commit it without output.base, then compose")
        common_schema([base], expected=schema_to_b64(ROW_SCHEMA))
        selection = on_base(store, base, shards, target=config.output.dataset, run_id=ctx.run_id)
        shards, quarantine = [*selection.shards, *shards], [*selection.quarantine, *quarantine]
        stats = merge_stats([base.manifest.stats, stats], selection.excluded)
        lineage["parents"] = [base.label]
        layout = LAYOUT_DATA_KEYS
    manifest = commit_version(
        store,
        dataset=config.output.dataset,
        staged_shards=shards,
        staged_quarantine=quarantine,
        lineage=lineage,
        stats=stats,
        arrow_schema_b64=schema_to_b64(ROW_SCHEMA),
        hf_features=hf_features(),
        config=config_record(config),  # config.yaml beside the version manifest, redacted
        layout=layout,
    )
    store.put_bytes(ctx.layout.committed, json.dumps({"version": manifest.lineage.version}).encode())
    return manifest


def base_part(store: ObjectStore, config: RunConfig) -> Part | None:
    """The committed version `output.base` names (REF of output.dataset, or DATASET@REF), or None when
    unset, or when it is `latest` of output.dataset and that has no version yet (the first run)."""
    if config.output.base is None:
        return None
    dataset, _, ref = config.output.base.rpartition("@")
    try:
        return load_part(store, dataset or config.output.dataset, ref)
    except VersionNotFound:
        if dataset in ("", config.output.dataset) and ref == "latest":
            return None
        raise


def commit_refusal(config: RunConfig, plan: RunPlan, outcomes: list[ShardOutcome]) -> Refusal | None:
    """Why this finished run must not become a version (empty, systemic, an outage), or None."""
    by_reason: Counter[str] = Counter()
    examples: dict[str, QuarantineExample] = {}
    for o in outcomes:
        by_reason.update(o.by_reason)
        for reason, example in o.examples.items():
            examples.setdefault(reason, example)
    extra = sum(o.segments - o.recordings_cut for o in outcomes)  # a recording's segments are clips each
    return check_commit(clips_in=plan.clips + extra, rows=sum(o.rows for o in outcomes), by_reason=by_reason,
                        examples=examples, output=config.output)


def refuse(store: ObjectStore, ctx: RunContext, refusal: Refusal) -> None:
    """Record the refusal in staging (the next attempt of this run then retries model-stage failures
    too) and raise it; nothing is published and `latest` does not move."""
    store.put_bytes(ctx.layout.refused, refusal.model_dump_json().encode())
    raise CommitRefused(refusal)


def committed_version(store: ObjectStore, ctx: RunContext) -> str | None:
    """The version this run committed, if it did (its staging area records it)."""
    try:
        return str(json.loads(store.get_bytes(ctx.layout.committed))["version"])
    except NotFound:
        return None


def finished_shards(config: RunConfig) -> tuple[int, int]:
    """(shards with a completion marker, shards planned) of this config's run, for resume hints."""
    ctx = run_context(config)
    store = run_store(config)
    plan = load_plan(store, ctx.staging)
    if plan is None:
        return 0, 0
    return len(list(store.list(ctx.layout.markers))), plan.shards


def recorded_outcomes(store: ObjectStore, ctx: RunContext, plan: RunPlan) -> list[ShardOutcome] | None:
    """Every shard's recorded outcome (a committed run's), or None if one is missing."""
    outcomes = []
    for i in range(plan.shards):
        outcome = finished_outcome(store, ctx, i, redo=False)
        if outcome is None:
            return None
        outcomes.append(outcome.model_copy(update={"skipped": True}))
    return outcomes


def manifest_of_run(store: ObjectStore, dataset: str, run_id: str) -> Manifest | None:
    """The latest version's manifest if this run published it (a retried commit finds its own)."""
    try:
        manifest = read_manifest(store, dataset, resolve_version(store, dataset, "latest"))
    except NotFound:
        return None
    return manifest if manifest.lineage.run_id == run_id else None


def combine_stats(plan: RunPlan, outcomes: list[ShardOutcome]) -> Stats:
    """The version's stats from its shards' outcomes; every clip in is a row or quarantined, or no commit."""
    by_reason: Counter[str] = Counter()
    qc: Counter[str] = Counter()
    attrs: dict[str, Counter[str]] = {}
    for o in outcomes:
        by_reason.update(o.by_reason)
        qc.update(o.qc_failures)
        for key, counts in o.attribute_counts.items():
            attrs.setdefault(key, Counter()).update(counts)
    stats = Stats(
        clips_in=plan.clips,
        rows=sum(o.rows for o in outcomes),
        quarantined=sum(o.quarantined for o in outcomes),
        quarantine_by_reason=dict(sorted(by_reason.items())),
        audio_hours=round(sum(o.audio_seconds for o in outcomes) / 3600, 6),
        rows_without_transcript=sum(o.rows_without_transcript for o in outcomes),
        recordings_cut=sum(o.recordings_cut for o in outcomes),
        segments=sum(o.segments for o in outcomes),
        qc_failures=dict(sorted(qc.items())),
        attribute_counts={k: dict(v.most_common()) for k, v in attrs.items()},
    )
    if stats.rows + stats.quarantined != stats.clips_in - stats.recordings_cut + stats.segments:
        cut = f" - recordings cut ({stats.recordings_cut}) + segments ({stats.segments})" if stats.segments else ""
        raise RuntimeError(f"clips in ({stats.clips_in}){cut} != rows ({stats.rows}) + quarantined "
                           f"({stats.quarantined}); not committing")
    return stats
