"""Where a run's shard tasks execute, what they share, and how GPU stages and LLM endpoints are gated.

`runner` picks the engine: threads (default) or processes on the flow's machine, a Dask cluster
(prefect-dask: a local one, or an existing scheduler at `cluster.address`) or a Ray cluster
(prefect-ray). The `distributed` extra brings Dask and Ray; they are imported only when asked for.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any, ParamSpec, TypeVar

from prefect import Task
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from flows.endpoint_limits import PrefectEndpointLimits
from schemas.config import RunConfig
from tasks.gpu import StageGate, cuda_devices, gpu_stages, no_gate
from tasks.llm.slots import install_slot_provider

# Task name → the tag its runs carry in the UI.
TASK_STAGE_TAGS = {"plan-shards": "plan", "process-shard": "shard", "commit-version": "commit"}

P = ParamSpec("P")
R = TypeVar("R")


class RunnerUnavailable(RuntimeError):
    """The configured runner's package is missing; the message names the extra to install."""


def _missing(runner: str, package: str) -> RunnerUnavailable:
    return RunnerUnavailable(f"runner {runner!r} needs {package}: pip install 'speechpairs[distributed]' "
                             "(or set runner: thread)")


# Settings for the Dask workers we start (how much each costs: docs/decisions.md):
# - Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536. Setting any malloc threshold turns off glibc's
#   dynamic mmap threshold, so every array over 128 KiB is mmapped and unmapped afresh and its pages
#   faulted in again, which slows per-clip DSP. None unsets the variable.
# - The worker's statistical profiler samples the task thread's stack every 10 ms for the dashboard's
#   profile page (our local clusters have no dashboard), which slows shards.
DASK_WORKER_CONFIG: dict[str, Any] = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                                      "distributed.worker.profile.enabled": False}


def tune_dask_workers() -> None:
    """Apply DASK_WORKER_CONFIG to the Dask workers this process starts from now on."""
    import dask

    dask.config.set(DASK_WORKER_CONFIG)


def task_runner(config: RunConfig) -> TaskRunner[Any]:
    """The Prefect task runner for `config.runner`."""
    cluster = config.cluster
    if config.runner in ("thread", "sequential"):
        return ThreadPoolTaskRunner(max_workers=1 if config.runner == "sequential" else config.max_workers)
    if config.runner == "process":
        return ProcessPoolTaskRunner(max_workers=config.max_workers)
    if config.runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise _missing("dask", "prefect-dask") from None
        if cluster.address:
            return DaskTaskRunner(address=cluster.address)
        # A throwaway local cluster: one process per worker, bound to loopback, no dashboard.
        tune_dask_workers()
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": cluster.workers, "threads_per_worker": cluster.threads_per_worker,
            "processes": True, "host": "127.0.0.1", "dashboard_address": None})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise _missing("ray", "prefect-ray") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    if cluster.address:
        return RayTaskRunner(address=cluster.address)
    return RayTaskRunner(init_kwargs={"num_cpus": cluster.workers, "include_dashboard": False,
                                      "_node_ip_address": "127.0.0.1", "configure_logging": False})


def in_this_process(config: RunConfig) -> bool:
    """Whether shard tasks run in the flow's own process (threads), so they can call back into it
    (the CLI's progress bar); in other processes they have no such callback."""
    return config.runner in ("thread", "sequential")


def flow_options(config: RunConfig) -> dict[str, Any]:
    """`Flow.with_options` keywords for this config: the task runner and, if set, shared result storage."""
    options: dict[str, Any] = {"task_runner": task_runner(config)}
    if config.cluster.result_storage:
        # A block slug ("s3-bucket/name"): Prefect loads the saved block wherever a task runs.
        options.update(result_storage=config.cluster.result_storage, persist_result=True)
    return options


def task_options(task: Task[P, R], config: RunConfig) -> Task[P, R]:
    """`task` with its tags and shared result storage.

    A shard task that runs a gated stage is tagged `gpu`, so ops can also cap it with a tag limit
    (`prefect concurrency-limit create gpu 1`). Stage tags (`plan`, `shard`, `commit`) are opt-in
    (`cluster.stage_tags`): Prefect leases a tag-concurrency slot for every tagged task run, a round
    trip per task run (docs/decisions.md).
    Results persist to the configured block so remote workers and retries share them.
    """
    tags = {TASK_STAGE_TAGS.get(task.name, task.name)} if config.cluster.stage_tags else set()
    if task.name == "process-shard" and gpu_stages(config):
        tags.add("gpu")
    options: dict[str, Any] = {"tags": tags}
    if config.cluster.result_storage:
        # Keyed by flow run: a Prefect retry of the same flow run reuses finished tasks' results,
        # a new run recomputes (and the shards' completion markers decide what is really redone).
        per_shard = "-{parameters[index]:05d}" if task.name == "process-shard" else ""
        options.update(result_storage=config.cluster.result_storage, persist_result=True, cache_policy=None,
                       result_storage_key=f"speechpairs/{{flow_run.id}}/{task.name}{per_shard}.pickle")
    return task.with_options(**options)


def ensure_gpu_limit(config: RunConfig) -> int | None:
    """Create the GPU concurrency limit if a GPU stage needs it (or resize it to `cluster.gpu_slots`).

    Returns the slots in force, or None when nothing is gated. A new limit gets one slot per GPU this
    machine sees (at least one); an existing one is left as ops set it unless `gpu_slots` is given.
    """
    if not gpu_stages(config):
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name, wanted = config.cluster.gpu_limit, config.cluster.gpu_slots
    with get_client(sync_client=True) as client:
        if wanted is None:
            try:
                return int(client.read_global_concurrency_limit_by_name(name).limit)
            except ObjectNotFound:
                wanted = max(1, cuda_devices())
        client.upsert_global_concurrency_limit_by_name(name, wanted)
    return wanted


# llm.endpoint_limit: the OpenAI-compatible backends of this process hold their endpoint slots in
# Prefect global concurrency limits (tasks/llm/slots.py decides where a limit applies, this is how it
# is held). Installed on import, not at the flow's start: shard tasks build their LLM backend in
# worker processes (process, Dask, Ray runners), which import this module (with flows/generate.py)
# to run them but never run the flow's body.
install_slot_provider(PrefectEndpointLimits())


def stage_gate(config: RunConfig) -> StageGate:
    """A gate that holds one slot of the GPU limit around each gated stage (pass-through otherwise)."""
    gated = gpu_stages(config)
    if not gated:
        return no_gate
    from prefect.concurrency.sync import concurrency

    name = config.cluster.gpu_limit

    def gate(stage: str) -> AbstractContextManager[object]:
        return concurrency(name, occupy=1, strict=True) if stage in gated else no_gate(stage)

    return gate
