"""The generate flow: plan shards → process each shard → commit one version. It only composes.

One Prefect task run per shard (never per clip) keeps the UI and API fast on million-clip runs.
A re-run of the same config resumes its staging area: finished shards are skipped by their
completion markers and a committed run is not committed twice.
"""

from __future__ import annotations

import time
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import CancelledRun
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed

from flows.progress import ProgressMeter
from flows.reporting import (
    RunSummary,
    count_shard,
    forward_pipeline_logs,
    name_flow_run,
    publish_artifacts,
    show_progress,
    summarize,
)
from flows.runners import ensure_gpu_limit, flow_options, in_this_process, stage_gate, task_options
from schemas.config import RunConfig
from schemas.manifest import Manifest
from storage.lease import LeaseLost, RunBusy, RunLease
from storage.objectstore import ObjectStore
from storage.preflight import StorageProblem, check_writable
from storage.versions import read_manifest
from tasks.commit_gate import CommitRefused
from tasks.describe import load_bins
from tasks.gpu import gpu_stages
from tasks.instructions import instruction_pool
from tasks.llm import make_backend
from tasks.pipeline import ProgressHook, ShardOutcome, process_shard, report_reused, report_total, run_backend
from tasks.plan import RunPlan, load_shard_plan, plan_run
from tasks.publish import combine_stats, commit_refusal, committed_version, publish, recorded_outcomes, refuse
from tasks.run import RunContext, launch_config, run_context, run_lease, run_store
from tasks.stopping import RunInterrupted, check_stop, stop_requested

forward_pipeline_logs()  # on import: shard tasks in worker processes forward their records too


def _unless_stopping(*_: Any) -> bool:
    """Task retry condition: never retry once the run was asked to stop (SIGTERM/SIGINT)."""
    return not stop_requested()


@task(name="plan-shards", task_run_name="plan-shards", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=_unless_stopping)
def plan_task(config: RunConfig, ctx: RunContext) -> RunPlan:
    return plan_run(config, run_store(config), ctx.staging, ctx.run_id)


@task(name="process-shard", task_run_name="shard-{index:05d}", retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE, retry_condition_fn=_unless_stopping)
def shard_task(config: RunConfig, ctx: RunContext, index: int, progress: ProgressHook | None = None) -> ShardOutcome:
    store = run_store(config)
    backend = run_backend(config, store, ctx)
    try:
        return process_shard(load_shard_plan(store, ctx.staging, index), config, store, ctx, backend,
                             gate=stage_gate(config), progress=progress)
    except RunInterrupted as exc:
        # Cancelled, not failed: no retry, no traceback; the shard has no marker and is redone next run.
        return cast(ShardOutcome, Cancelled(message=str(exc)))
    finally:
        backend.close()


@task(name="commit-version", task_run_name="commit-version", retries=2, retry_delay_seconds=5,
      cache_policy=NO_CACHE, retry_condition_fn=_unless_stopping)
def commit_task(config: RunConfig, ctx: RunContext, plan: RunPlan, outcomes: list[ShardOutcome]) -> Manifest:
    return publish(config, ctx, plan, outcomes, str(flow_run.id) if flow_run.id else None)


def run_plain(config: RunConfig, progress: ProgressHook | None = None) -> Manifest:
    """The same stages without Prefect, one shard after another (tests, benchmarks, debugging)."""
    config = launch_config(config)
    make_backend(config.llm).preflight()
    instruction_pool(config.describe)  # every pool line parsed: a bad tag fails the run, not each clip
    ctx = run_context(config)
    store = run_store(config)
    with run_lease(config, store, ctx) as lease:
        plan = plan_run(config, store, ctx.staging, ctx.run_id)
        report_total(progress, plan.clips)
        version = committed_version(store, ctx)
        if version is not None:
            return read_manifest(store, config.output.dataset, version)
        backend = run_backend(config, store, ctx)
        outcomes = [process_shard(load_shard_plan(store, ctx.staging, i), config, store, ctx, backend,
                                  progress=progress)
                    for i in range(plan.shards)]
        refusal = commit_refusal(config, plan, outcomes)
        if refusal is not None:
            refuse(store, ctx, refusal)
        check_stop("before commit")
        lease.check()
        return publish(config, ctx, plan, outcomes)


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


@flow(name="generate-dataset", flow_run_name="generate-{config.output.dataset}", validate_parameters=True)
def generate_dataset(config: RunConfig, progress: ProgressHook | None = None) -> RunSummary:
    """Corpus → committed dataset version. Re-running the same config resumes, never duplicates.

    A refused commit ends the flow run Failed and a stop request Cancelled, each with its message
    and no traceback; the caller gets the CommitRefused / RunInterrupted exception. `progress` is
    for a caller in this process (the CLI's progress bar); a deployment leaves it unset."""
    try:
        return _generate(config, progress)
    except (CommitRefused, StorageProblem, RunBusy, LeaseLost) as exc:
        return cast(RunSummary, Failed(message=str(exc), data=exc))
    except RunInterrupted as exc:
        get_run_logger().warning("stopped: %s; unfinished shards are redone by the next run", exc)
        return cast(RunSummary, Cancelled(message=str(exc), data=exc))


def _generate(config: RunConfig, progress: ProgressHook | None) -> RunSummary:
    started = time.perf_counter()
    config = launch_config(config)  # relative paths of a deployment's parameters → this run's absolute ones
    artifact = cast(UUID, create_progress_artifact(progress=0.0, key="shard-progress",
                                                   description=f"**{config.output.dataset}**: starting (preflight, "
                                                               "models, shard plan)"))
    make_backend(config.llm).preflight()  # an unreachable endpoint fails the run, not every clip
    instruction_pool(config.describe)  # so does a malformed instruction tag (InstructionPoolError)
    check_writable(run_store(config), config.output.dataset)  # a bad output root too, in one clear line
    ctx = run_context(config)  # loads Whisper/classifiers: a missing model fails here, before any clip
    store = run_store(config)
    with run_lease(config, store, ctx) as lease:  # one launch of a run at a time
        return _generate_leased(config, ctx, store, lease, artifact, started, progress)


def _generate_leased(config: RunConfig, ctx: RunContext, store: ObjectStore, lease: RunLease, artifact: UUID,
                     started: float, progress: ProgressHook | None) -> RunSummary:
    logger = get_run_logger()
    slots = ensure_gpu_limit(config)
    if slots is not None:
        logger.info("GPU stages %s hold slots of the concurrency limit %r (%d)", sorted(gpu_stages(config)),
                    config.cluster.gpu_limit, slots)
    plan = task_options(plan_task, config)(config, ctx)
    logger.info("run %s: %d clips in %d shards of ≤%d", ctx.run_id, plan.clips, plan.shards, plan.shard_size)
    report_total(progress, plan.clips)
    meter = ProgressMeter(plan.clips, plan.shards)
    show_progress(artifact, meter, config.output.dataset)
    version = committed_version(store, ctx)
    outcomes = recorded_outcomes(store, ctx, plan) if version is not None else None
    if outcomes is not None:  # committed earlier: report it, never redo or re-commit
        for o in outcomes:
            report_reused(progress, o)
            count_shard(meter, o)
        show_progress(artifact, meter, config.output.dataset)
    else:
        meter.start()  # throughput from here: start-up (preflight, models, planning) is behind us
        shard_progress = progress if in_this_process(config) else None  # a callback never leaves this process
        futures = task_options(shard_task, config).map(unmapped(config), unmapped(ctx), list(range(plan.shards)),
                                                       unmapped(shard_progress))
        outcomes = gather_shards(list(futures), artifact, meter, config.output.dataset)
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


def run_generate(config: RunConfig, progress: ProgressHook | None = None, **options: Any) -> RunSummary:
    """Run the flow with the task runner (and result storage) the config asks for; `progress` hears of
    clips as they finish (shards in this process only); `options` go to `Flow.with_options` as well
    (the CLI passes an `on_running` hook that prints the run's UI link)."""
    flow_ = generate_dataset.with_options(**flow_options(config), **options)
    return flow_(config, progress)  # type: ignore[no-any-return]
