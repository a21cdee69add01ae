"""Scale-out: the `runner` setting (thread/process/Dask/Ray), shared result storage, GPU gating."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from pathlib import Path

import boto3
import pytest

from flows.generate import run_generate
from flows.runners import (
    RunnerUnavailable,
    ensure_gpu_limit,
    flow_options,
    stage_gate,
    task_options,
    task_runner,
)
from schemas.config import RunConfig, load_config, parse_config
from storage.objectstore import LocalStore
from storage.versions import file_key, read_manifest
from tasks.gpu import gpu_stages, model_stages
from tasks.run import run_context
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3

pytestmark = pytest.mark.usefixtures("prefect_harness")


def quickstart(root: Path, *overrides: str) -> RunConfig:
    return load_config(REPO / "examples" / "quickstart.yaml",
                       [f"output.root={root}", "output.shard_size=2", *overrides], environ={})


def shard_bytes(root: Path, dataset: str) -> dict[str, bytes]:
    """Every shard and quarantine part v0001 lists, by its key (content hashes are in the data keys)."""
    store = LocalStore(root)
    manifest = read_manifest(store, dataset, "v0001")
    return {file_key(manifest, info): store.get_bytes(file_key(manifest, info))
            for info in [*manifest.shards, *manifest.quarantine]}


def same_run_with(tmp_path: Path, config: RunConfig, overrides: list[str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The committed shards of `config` on the thread runner, and of the same run on another runner.

    Between the two, everything the first run produced after planning is moved away (only the
    run's plan is kept), so the second runner redoes every shard of the very same run.
    """
    root, dataset = Path(config.output.root), config.output.dataset
    first = run_generate(config)
    assert first.version == "v0001"
    moved = tmp_path / "thread-run"
    shutil.move(root, moved)
    staging = run_context(config).staging
    (root / staging).mkdir(parents=True)
    shutil.copy2(moved / staging / "plan.json", root / staging / "plan.json")
    shutil.copytree(moved / staging / "plan", root / staging / "plan")
    summary = run_generate(parse_config(config.model_dump(mode="json"), overrides, environ={}))
    assert (summary.version, summary.rows, summary.shards_skipped) == ("v0001", first.rows, 0)
    return shard_bytes(moved, dataset), shard_bytes(root, dataset)


def test_dask_local_cluster_of_two_gives_byte_identical_shards(tmp_path: Path) -> None:
    thread, dask = same_run_with(tmp_path, quickstart(tmp_path / "out", "output.dataset=dasked"),
                                 ["runner=dask", "cluster.workers=2"])
    assert len(thread) == 5  # 10 clips in shards of 2
    assert dask == thread


def test_ray_local_cluster_gives_byte_identical_shards(tmp_path: Path) -> None:
    thread, ray = same_run_with(tmp_path, quickstart(tmp_path / "out", "output.dataset=rayed"),
                                ["runner=ray", "cluster.workers=2"])
    assert len(thread) == 5
    assert ray == thread


def test_process_pool_runner_commits_the_same_rows(tmp_path: Path) -> None:
    thread, process = same_run_with(tmp_path, quickstart(tmp_path / "out", "output.dataset=forked"),
                                    ["runner=process", "max_workers=2"])
    assert process == thread


def test_runner_settings_map_to_prefect_task_runners(tmp_path: Path) -> None:
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner
    from prefect_ray import RayTaskRunner

    def runner(*overrides: str) -> object:
        return task_runner(quickstart(tmp_path, *overrides))

    assert isinstance(runner("runner=sequential"), ThreadPoolTaskRunner)
    assert isinstance(runner("runner=process"), ProcessPoolTaskRunner)
    remote = runner("runner=dask", "cluster.address=tcp://127.0.0.1:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"
    local = runner("runner=dask", "cluster.workers=3")
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["host"] == "127.0.0.1"
    ray = runner("runner=ray", "cluster.address=ray://127.0.0.1:10001")
    assert isinstance(ray, RayTaskRunner) and ray.address == "ray://127.0.0.1:10001"
    assert "result_storage" not in flow_options(quickstart(tmp_path))
    assert flow_options(quickstart(tmp_path, "cluster.result_storage=s3-bucket/results"))["persist_result"] is True
    from flows.generate import commit_task, shard_task

    assert task_options(shard_task, quickstart(tmp_path)).tags == set()  # tag leases cost a round trip each
    assert task_options(commit_task, quickstart(tmp_path, "cluster.stage_tags=true")).tags == {"commit"}
    gpu = quickstart(tmp_path, "features.asr.enabled=true", "cluster.gpu_gate=always")
    assert task_options(shard_task, gpu).tags == {"gpu"}
    assert task_options(commit_task, gpu).tags == set()
    # Scaling settings never change the rows, so they never change the run key.
    assert (quickstart(tmp_path, "runner=dask", "cluster.workers=8").config_hash()
            == quickstart(tmp_path).config_hash())


def test_local_dask_workers_keep_glibcs_malloc_defaults_and_skip_the_profiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dask's default MALLOC_TRIM_THRESHOLD_ made our DSP 1.6x slower in its workers, its stack profiler
    another 10-20% (bench/scale.py)."""
    import dask
    from distributed import Client, LocalCluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    runner = task_runner(quickstart(tmp_path, "runner=dask", "cluster.workers=1"))
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:  # type: ignore[attr-defined]
        env = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"),
                                  dask.config.get("distributed.worker.profile.enabled")))
    assert list(env.values()) == [(None, "1", False)]  # trim threshold unset, Dask's thread caps kept, no profiler


def test_a_missing_distributed_extra_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # import fails as if not installed
    with pytest.raises(RunnerUnavailable, match=r"speechpairs\[distributed\]"):
        task_runner(quickstart(tmp_path, "runner=dask"))


@pytest.mark.s3
def test_task_results_persist_to_a_saved_object_store_block(tmp_path: Path, seaweedfs: SeaweedS3) -> None:
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    prefix = f"prefect-results/{tmp_path.name}"
    S3Bucket(bucket_name=seaweedfs.bucket, bucket_folder=prefix, credentials=AwsCredentials(
        aws_access_key_id=seaweedfs.access_key, aws_secret_access_key=seaweedfs.secret_key,
        region_name=seaweedfs.region,
        aws_client_parameters=AwsClientParameters(endpoint_url=seaweedfs.endpoint_url)),
    ).save("speechpairs-results-test", overwrite=True)
    config = quickstart(tmp_path / "out", "output.dataset=persisted",
                        "cluster.result_storage=s3-bucket/speechpairs-results-test")
    summary = run_generate(config)
    s3 = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=prefix).get("Contents", [])]
    # One result per task run (plan, each shard, commit), keyed by the flow run for Prefect retries.
    names = {k.rsplit("/", 1)[-1] for k in keys if "/speechpairs/" in k}
    assert {"plan-shards.pickle", "commit-version.pickle",
            *(f"process-shard-{i:05d}.pickle" for i in range(summary.shards))} <= names, keys


def test_gpu_stages_follow_devices_and_the_gate_setting(tmp_path: Path) -> None:
    tiny = ["features.asr.enabled=true", "features.asr.device=cpu"]
    assert model_stages(quickstart(tmp_path, *tiny)) == {"asr"}
    assert gpu_stages(quickstart(tmp_path, *tiny)) == set()  # on CPU: nothing to gate
    assert gpu_stages(quickstart(tmp_path, *tiny, "cluster.gpu_gate=always")) == {"asr"}
    assert gpu_stages(quickstart(tmp_path, "features.asr.enabled=true", "features.asr.device=cuda")) == {"asr"}
    assert gpu_stages(quickstart(tmp_path, "features.asr.enabled=true", "features.asr.device=cuda",
                                 "cluster.gpu_gate=never")) == set()
    assert gpu_stages(quickstart(tmp_path)) == set()  # template LLM, no models
    assert ensure_gpu_limit(quickstart(tmp_path)) is None


def test_the_gpu_limit_lets_one_stage_at_a_time_through(tmp_path: Path) -> None:
    config = quickstart(tmp_path, "features.asr.enabled=true", "cluster.gpu_gate=always",
                        f"cluster.gpu_limit=gpu-test-{tmp_path.name}")
    assert ensure_gpu_limit(config) == 1  # a new limit: one slot per GPU seen, at least one
    assert ensure_gpu_limit(config.model_copy(update={"cluster": config.cluster.model_copy(
        update={"gpu_slots": 1})})) == 1
    gate = stage_gate(config)
    spans: list[tuple[float, float]] = []

    def work() -> None:
        with gate("asr"):
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(spans) == 3
    spans.sort()
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans)), spans  # never two at once
    with gate("classify"):  # not a stage this config runs: passes straight through
        pass
