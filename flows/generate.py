"""The generate flow: plan shards → process each shard → commit one version. It only composes.

One Prefect task run per shard (never per clip) keeps the UI and API fast on million-clip runs.
A re-run of the same config resumes its staging area: finished shards are skipped by their
completion markers and a committed run is not committed twice.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections import Counter
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import CancelledRun
from prefect.futures import PrefectFuture, as_completed
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed

from flows.artifacts import (
    RunSummary,
    count_shard,
    publish_artifacts,
    show_progress,
    summary_table,  # noqa: F401 - re-exported: tests read the table from here
)
from flows.progress import ProgressMeter
from flows.runners import ensure_gpu_limit, flow_options, stage_gate, task_options
from schemas.arrow import ROW_SCHEMA, hf_features, schema_to_b64
from schemas.attributes import ATTRIBUTE_LABELS
from schemas.canonical import canonical_config, config_record
from schemas.config import RunConfig
from schemas.manifest import Manifest, Stats
from storage.layout import staging_prefix
from storage.lease import LeaseLost, RunBusy, RunLease
from storage.objectstore import NotFound, ObjectStore, open_store
from storage.preflight import StorageProblem, check_writable
from storage.versions import commit_version, read_manifest, resolve_version
from tasks.audio import AUDIO_VERSION
from tasks.commit_gate import CommitRefused, QuarantineExample, Refusal, check_commit
from tasks.describe import DESCRIBE_VERSION, load_bins
from tasks.features import EXTRACTOR_VERSIONS
from tasks.features.models import load_models
from tasks.features.phonemes import PHONEME_VERSION
from tasks.gpu import gpu_stages
from tasks.ingest import source_fingerprint
from tasks.instructions import instruction_pool, pool_hash
from tasks.llm import make_backend
from tasks.pipeline import (
    RunContext,
    ShardOutcome,
    finished_outcome,
    process_shard,
    report_done,
    report_total,
    run_backend,
)
from tasks.plan import RunPlan, load_plan, load_shard_plan, plan_run
from tasks.stopping import RunInterrupted, check_stop, stop_requested


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    version = metadata.version("speechpairs")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return f"{version}+g{sha}" if sha else version
    except (OSError, subprocess.SubprocessError):
        return version


def launch_config(config: RunConfig) -> RunConfig:
    """The config a run works with and is keyed by: canonical (schemas/canonical.py), relative paths
    resolved against this process's working directory (a CLI launch's, or a deployment worker's:
    the project directory), so both spellings of one corpus and settings are one run."""
    return canonical_config(config, Path.cwd())


def run_context(config: RunConfig) -> RunContext:
    config = launch_config(config)  # idempotent: the flow already runs with the canonical config
    config_hash = config.config_hash()
    # Same config + same corpus content = same run (resumable); a changed corpus is a new run.
    run_id = f"run-{config_hash}-{source_fingerprint(config.sources)[:8]}"
    staging = staging_prefix(config.output.dataset, run_id)
    return RunContext(
        run_id=run_id,
        staging=staging,
        after_refusal=_store(config).exists(f"{staging}/{REFUSED}"),
        config_hash=config_hash,
        pipeline_version=code_version(),
        bins_version=load_bins(config.describe.bins).full_version,
        extractor_versions={**EXTRACTOR_VERSIONS, "audio": AUDIO_VERSION, "describe": DESCRIBE_VERSION,
                            **({"phonemes": PHONEME_VERSION} if config.features.phoneme_rate else {}),
                            **load_models(config.features).versions()},
    )


def _store(config: RunConfig) -> ObjectStore:
    return open_store(config.output.root, config.s3)


def _unless_stopping(*_: Any) -> bool:
    """Task retry condition: never retry once the run was asked to stop (SIGTERM/SIGINT)."""
    return not stop_requested()


@task(name="plan-shards", task_run_name="plan-shards", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=_unless_stopping)
def plan_task(config: RunConfig, ctx: RunContext) -> RunPlan:
    return plan_run(config, _store(config), ctx.staging, ctx.run_id)


@task(name="process-shard", task_run_name="shard-{index:05d}", retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE, retry_condition_fn=_unless_stopping)
def shard_task(config: RunConfig, ctx: RunContext, index: int) -> ShardOutcome:
    store = _store(config)
    backend = run_backend(config, store, ctx)
    try:
        return process_shard(load_shard_plan(store, ctx.staging, index), config, store, ctx, backend,
                             gate=stage_gate(config))
    except RunInterrupted as exc:
        # Cancelled, not failed: no retry, no traceback; the shard has no marker and is redone next run.
        return cast(ShardOutcome, Cancelled(message=str(exc)))
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()


def publish(config: RunConfig, ctx: RunContext, plan: RunPlan, outcomes: list[ShardOutcome],
            flow_run_id: str | None = None) -> Manifest:
    """Commit the run's staged shards as the next version (or find the one it already published)."""
    store = _store(config)
    stats = combine_stats(plan, outcomes)
    landed = manifest_of_run(store, config.output.dataset, ctx.run_id)
    if landed is not None:
        # An earlier attempt published the manifest but died before recording it: don't publish twice.
        store.put_bytes(committed_key(ctx), json.dumps({"version": landed.lineage.version}).encode())
        return landed
    backend = make_backend(config.llm)
    model = backend.model_info()
    lineage = {
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
    manifest = commit_version(
        store,
        dataset=config.output.dataset,
        staged_shards=[o.shard for o in outcomes if o.shard is not None],
        staged_quarantine=[o.quarantine for o in outcomes if o.quarantine is not None],
        lineage=lineage,
        stats=stats,
        arrow_schema_b64=schema_to_b64(ROW_SCHEMA),
        hf_features=hf_features(),
        config=config_record(config),  # config.yaml beside the manifest, redacted
    )
    store.put_bytes(committed_key(ctx), json.dumps({"version": manifest.lineage.version}).encode())
    return manifest


def run_plain(config: RunConfig) -> Manifest:
    """The same stages without Prefect, one shard after another (tests, benchmarks, debugging)."""
    config = launch_config(config)
    make_backend(config.llm).preflight()
    instruction_pool(config.describe)  # every pool line parsed: a bad tag fails the run, not each clip
    ctx = run_context(config)
    store = _store(config)
    with run_lease(config, store, ctx) as lease:
        plan = plan_run(config, store, ctx.staging, ctx.run_id)
        version = committed_version(store, ctx)
        if version is not None:
            return read_manifest(store, config.output.dataset, version)
        backend = run_backend(config, store, ctx)
        outcomes = [process_shard(load_shard_plan(store, ctx.staging, i), config, store, ctx, backend)
                    for i in range(plan.shards)]
        refusal = commit_refusal(config, plan, outcomes)
        if refusal is not None:
            refuse(store, ctx, refusal)
        check_stop("before commit")
        lease.check()
        return publish(config, ctx, plan, outcomes)


REFUSED = "refused.json"


def commit_refusal(config: RunConfig, plan: RunPlan, outcomes: list[ShardOutcome]) -> Refusal | None:
    """Why this finished run must not become a version (empty, systemic, an outage), or None."""
    by_reason: Counter[str] = Counter()
    examples: dict[str, QuarantineExample] = {}
    for o in outcomes:
        by_reason.update(o.by_reason)
        for reason, example in o.examples.items():
            examples.setdefault(reason, example)
    return check_commit(clips_in=plan.clips, rows=sum(o.rows for o in outcomes), by_reason=by_reason,
                        examples=examples, output=config.output)


def refuse(store: ObjectStore, ctx: RunContext, refusal: Refusal) -> None:
    """Record the refusal in staging (the next attempt of this run then retries model-stage failures
    too) and raise it; nothing is published and `latest` does not move."""
    store.put_bytes(f"{ctx.staging}/{REFUSED}", refusal.model_dump_json().encode())
    raise CommitRefused(refusal)


def committed_version(store: ObjectStore, ctx: RunContext) -> str | None:
    """The version this run committed, if it did (its staging area records it)."""
    try:
        return str(json.loads(store.get_bytes(committed_key(ctx)))["version"])
    except NotFound:
        return None


def finished_shards(config: RunConfig) -> tuple[int, int]:
    """(shards with a completion marker, shards planned) of this config's run, for resume hints."""
    ctx = run_context(config)
    store = _store(config)
    plan = load_plan(store, ctx.staging)
    if plan is None:
        return 0, 0
    return len(list(store.list(f"{ctx.staging}/markers/shard-"))), plan.shards


def recorded_outcomes(store: ObjectStore, ctx: RunContext, plan: RunPlan) -> list[ShardOutcome] | None:
    """Every shard's recorded outcome (a committed run's), or None if one is missing."""
    outcomes = []
    for i in range(plan.shards):
        outcome = finished_outcome(store, ctx, i, redo=False)
        if outcome is None:
            return None
        outcomes.append(outcome.model_copy(update={"skipped": True}))
    return outcomes


@task(name="commit-version", task_run_name="commit-version", retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE, retry_condition_fn=_unless_stopping)
def commit_task(config: RunConfig, ctx: RunContext, plan: RunPlan, outcomes: list[ShardOutcome]) -> Manifest:
    return publish(config, ctx, plan, outcomes, str(flow_run.id) if flow_run.id else None)


def manifest_of_run(store: ObjectStore, dataset: str, run_id: str) -> Manifest | None:
    """The latest version's manifest if this run published it (a retried commit finds its own)."""
    try:
        manifest = read_manifest(store, dataset, resolve_version(store, dataset, "latest"))
    except NotFound:
        return None
    return manifest if manifest.lineage.run_id == run_id else None


def committed_key(ctx: RunContext) -> str:
    return f"{ctx.staging}/committed.json"


def combine_stats(plan: RunPlan, outcomes: list[ShardOutcome]) -> Stats:
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
        qc_failures=dict(sorted(qc.items())),
        attribute_counts={k: dict(v.most_common()) for k, v in attrs.items()},
    )
    if stats.rows + stats.quarantined != stats.clips_in:
        raise RuntimeError(f"clips in ({stats.clips_in}) != rows ({stats.rows}) + quarantined "
                           f"({stats.quarantined}); not committing")
    return stats


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, but silent outside a flow or task run (plain runs, unit tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        super().emit(record)


# Our loggers: the pipeline's ("speechpairs.*") and the modules' own (`__name__`: storage.versions' commit
# lines, storage.lease, tasks.*).
PIPELINE_LOGGERS = ("speechpairs", "storage", "tasks")


def forward_pipeline_logs(names: tuple[str, ...] = PIPELINE_LOGGERS) -> None:
    """Send the plain-Python pipeline's records (quarantined clips by shard and clip id, commit lines)
    to the run's logs in the Prefect UI, from INFO up: left unset, these loggers would inherit the
    root's WARNING and drop INFO before any handler. What the console shows is the console handler's
    business (the CLI raises it to WARNING). Runs on import, so shard tasks in worker processes
    (process, Dask, Ray runners) forward theirs too; a no-op for a logger that already has an API
    handler (e.g. named in PREFECT_LOGGING_EXTRA_LOGGERS)."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(_RunLogHandler())


forward_pipeline_logs()


def gather_shards(futures: list[PrefectFuture[ShardOutcome]], progress: UUID, meter: ProgressMeter,
                  dataset: str) -> list[ShardOutcome]:
    """Wait for the shards as they finish, moving the progress artifact and logging one line per
    shard (skipped ones count as done); the outcomes come back in shard order."""
    logger = get_run_logger()
    index = {future: i for i, future in enumerate(futures)}
    done: dict[int, ShardOutcome] = {}
    if not futures:
        show_progress(progress, meter, dataset)
    for future in as_completed(futures):
        i = index[future]
        try:
            outcome = future.result()
        except CancelledRun:
            if stop_requested():
                raise RunInterrupted(f"shard {i:05d} abandoned") from None
            raise
        except Exception as exc:
            logger.error("shard %05d failed (task run shard-%05d): %s: %s", i, i, type(exc).__name__, exc)
            raise
        done[i] = outcome
        logger.info("shard %05d done: %d rows, %d quarantined (%d/%d shards)%s", outcome.index, outcome.rows,
                    outcome.quarantined, len(done), len(futures),
                    " [finished by an earlier attempt]" if outcome.skipped else "")
        count_shard(meter, outcome)
        show_progress(progress, meter, dataset)
    return [done[i] for i in range(len(futures))]


def name_flow_run(name: str) -> None:
    """Rename the current flow run (ops find runs by dataset and version); a failure only warns."""
    run_id = flow_run.id
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(UUID(str(run_id)), name=name)
    except Exception as exc:  # noqa: BLE001 - a cosmetic rename must never fail a committed run
        get_run_logger().warning("could not rename flow run %s to %r: %s: %s", run_id, name,
                                 type(exc).__name__, exc)


def summarize(config: RunConfig, ctx: RunContext, plan: RunPlan, outcomes: list[ShardOutcome],
              version: str | None, started: float, already: bool = False) -> RunSummary:
    """The run in numbers; `version` None for a run that was not committed (its staging area is named)."""
    stage_seconds: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    for o in outcomes:
        stage_seconds.update(o.stage_seconds)
        by_stage.update(o.by_stage)
        by_reason.update(o.by_reason)
    store = _store(config)
    backend = make_backend(config.llm)  # a constructor only: no model is loaded, no endpoint called
    model = backend.model_info()
    return RunSummary(
        llm_backend=backend.name,
        llm_model=(model.get("name") or backend.name) + (f"@{model['revision']}" if model.get("revision") else ""),
        seed_attributes=[ATTRIBUTE_LABELS[a] for a in config.describe.attributes],
        dataset=config.output.dataset,
        version=version or "not committed",
        location=store.uri(f"{config.output.dataset}/{version}" if version else ctx.staging),
        run_id=ctx.run_id,
        clips_in=plan.clips,
        skipped_files=plan.skipped_files,
        unentered_folders=plan.unentered_folders,
        rows=sum(o.rows for o in outcomes),
        quarantined=sum(o.quarantined for o in outcomes),
        quarantine_by_reason=dict(sorted(by_reason.items())),
        quarantine_by_stage=dict(sorted(by_stage.items())),
        audio_hours=round(sum(o.audio_seconds for o in outcomes) / 3600, 6),
        rows_without_transcript=sum(o.rows_without_transcript for o in outcomes),
        shards=plan.shards,
        shards_skipped=sum(o.skipped for o in outcomes),
        seconds=round(time.perf_counter() - started, 3),
        stage_seconds={k: round(v, 3) for k, v in sorted(stage_seconds.items())},
        tokens_prompt=sum(o.tokens_prompt for o in outcomes),
        tokens_completion=sum(o.tokens_completion for o in outcomes),
        already_committed=already,
    )


@flow(name="generate-dataset", flow_run_name="generate-{config.output.dataset}", validate_parameters=True)
def generate_dataset(config: RunConfig) -> RunSummary:
    """Corpus → committed dataset version. Re-running the same config resumes, never duplicates.

    A refused commit ends the flow run Failed and a stop request Cancelled, each with its message
    and no traceback; the caller gets the CommitRefused / RunInterrupted exception."""
    try:
        return _generate(config)
    except (CommitRefused, StorageProblem, RunBusy, LeaseLost) as exc:
        return cast(RunSummary, Failed(message=str(exc), data=exc))
    except RunInterrupted as exc:
        get_run_logger().warning("stopped: %s; unfinished shards are redone by the next run", exc)
        return cast(RunSummary, Cancelled(message=str(exc), data=exc))


def _generate(config: RunConfig) -> RunSummary:
    started = time.perf_counter()
    config = launch_config(config)  # relative paths of a deployment's parameters → this run's absolute ones
    progress = cast(UUID, create_progress_artifact(progress=0.0, key="shard-progress",
                                                   description=f"**{config.output.dataset}**: starting (preflight, "
                                                               "models, shard plan)"))
    make_backend(config.llm).preflight()  # an unreachable endpoint fails the run, not every clip
    instruction_pool(config.describe)  # so does a malformed instruction tag (InstructionPoolError)
    check_writable(_store(config), config.output.dataset)  # a bad output root too, in one clear line
    ctx = run_context(config)  # loads Whisper/classifiers: a missing model fails here, before any clip
    store = _store(config)
    with run_lease(config, store, ctx) as lease:  # one launch of a run at a time
        return _generate_leased(config, ctx, store, lease, progress, started)


def run_lease(config: RunConfig, store: ObjectStore, ctx: RunContext) -> RunLease:
    return RunLease(store, ctx.staging, ctx.run_id, ttl_s=config.output.lease_s,
                    wait=config.output.when_running == "wait")


def _generate_leased(config: RunConfig, ctx: RunContext, store: ObjectStore, lease: RunLease, progress: UUID,
                     started: float) -> RunSummary:
    logger = get_run_logger()
    slots = ensure_gpu_limit(config)
    if slots is not None:
        logger.info("GPU stages %s hold slots of the concurrency limit %r (%d)", sorted(gpu_stages(config)),
                    config.cluster.gpu_limit, slots)
    plan = task_options(plan_task, config)(config, ctx)
    logger.info("run %s: %d clips in %d shards of ≤%d", ctx.run_id, plan.clips, plan.shards, plan.shard_size)
    report_total(plan.clips)
    meter = ProgressMeter(plan.clips, plan.shards)
    show_progress(progress, meter, config.output.dataset)
    version = committed_version(store, ctx)
    outcomes = recorded_outcomes(store, ctx, plan) if version is not None else None
    if outcomes is not None:  # committed earlier: report it, never redo or re-commit
        for o in outcomes:
            report_done(o.clips, o.rows, reused=True)
            count_shard(meter, o)
        show_progress(progress, meter, config.output.dataset)
    else:
        meter.start()  # throughput from here: start-up (preflight, models, planning) is behind us
        futures = task_options(shard_task, config).map(unmapped(config), unmapped(ctx), list(range(plan.shards)))
        outcomes = gather_shards(list(futures), progress, meter, config.output.dataset)
    already = version is not None
    if version is None:
        refusal = commit_refusal(config, plan, outcomes)
        if refusal is not None:
            publish_artifacts(summarize(config, ctx, plan, outcomes, None, started),
                              combine_stats(plan, outcomes), load_bins(config.describe.bins))
            logger.error("not committed (%s): %s", refusal.kind, refusal.message)
            refuse(store, ctx, refusal)
        check_stop("before commit")
        lease.check()
        version = task_options(commit_task, config)(config, ctx, plan, outcomes).lineage.version
    name_flow_run(f"generate-{config.output.dataset}-{version}")
    summary = summarize(config, ctx, plan, outcomes, version, started, already)
    publish_artifacts(summary, combine_stats(plan, outcomes), load_bins(config.describe.bins))
    logger.info("committed %s %s: %d rows, %d quarantined (%s)", summary.dataset, version, summary.rows,
                summary.quarantined, ", ".join(f"{k}={v}" for k, v in summary.quarantine_by_reason.items()) or "none")
    return summary


def run_generate(config: RunConfig, **options: Any) -> RunSummary:
    """Run the flow with the task runner (and result storage) the config asks for; `options` go to
    `Flow.with_options` as well (the CLI passes an `on_running` hook that prints the run's UI link)."""
    return generate_dataset.with_options(**flow_options(config), **options)(config)  # type: ignore[no-any-return]
