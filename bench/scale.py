"""Scale-out benchmark: the generate flow on a local Dask cluster of 2 workers vs 1, and flow vs plain loop.

Prints ratios measured in one run (targets: Dask 2 workers ÷ 1 worker throughput ≥ 1.7× on 2 cores;
Prefect flow ÷ plain loop wall time ≤ 1.15×). Each Dask cluster is started and warmed up (one small
run imports everything on its workers) before timing, as a long-lived cluster at
`cluster.address` would be; its start-up time is printed separately. The Prefect API (a
temporary local server) is started before timing. The corpus copies are distinct audio
(bench/pipeline.py `repeated_manifest`), written before anything is timed.

    .venv/bin/python bench/scale.py [--repeat 500] [--shard-size 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per worker process: no BLAS oversubscription

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pipeline import make_config, plain_loop, repeated_manifest


def timed_flow(manifest: Path, root: Path, shard_size: int, *overrides: str) -> tuple[float, int]:
    from flows.generate import run_generate
    from schemas.config import parse_config

    base = make_config(manifest, root, "bench", shard_size).model_dump(mode="json")
    config = parse_config(base, list(overrides), environ={})
    t0 = time.perf_counter()
    summary = run_generate(config)
    return time.perf_counter() - t0, summary.rows


def on_dask_cluster(workers: int, manifest: Path, work: Path, shard_size: int) -> tuple[float, int, float]:
    """(seconds, rows) of a run on a warmed-up local cluster of `workers` processes, and its start-up."""
    from distributed import LocalCluster

    from flows.runners import tune_dask_workers

    tune_dask_workers()  # as the dask runner does for the local clusters it starts
    t0 = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        address = ["runner=dask", f"cluster.address={cluster.scheduler_address}"]
        timed_flow(repeated_manifest(work, 1), work / f"warm-dask{workers}", 2, *address)  # 5 shards: all workers
        startup = time.perf_counter() - t0
        seconds, rows = timed_flow(manifest, work / f"dask{workers}", shard_size, *address)
    return seconds, rows, startup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=500, help="sample corpus repetitions (10 clips each)")
    parser.add_argument("--shard-size", type=int, default=500,
                        help="clips per shard (ARCHITECTURE.md: ~500-5,000 in production)")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=90):
        work = Path(tmp)
        manifest = repeated_manifest(work, args.repeat)
        clips = 10 * args.repeat
        # Warm-up: imports, first flow registration, page cache of the audio files.
        timed_flow(repeated_manifest(work, 1), work / "warm", args.shard_size, "runner=sequential")

        dask1, rows1, start1 = on_dask_cluster(1, manifest, work, args.shard_size)
        dask2, rows2, start2 = on_dask_cluster(2, manifest, work, args.shard_size)
        t0 = time.perf_counter()
        rows_plain = plain_loop(make_config(manifest, work / "plain", "bench", args.shard_size))
        plain_s = time.perf_counter() - t0
        flow_s, rows_flow = timed_flow(manifest, work / "flow", args.shard_size, "runner=sequential")
    assert rows1 == rows2 == rows_plain == rows_flow == clips, (rows1, rows2, rows_plain, rows_flow, clips)

    shards = (clips + args.shard_size - 1) // args.shard_size
    speedup = dask1 / dask2
    overhead = flow_s / plain_s
    print(f"corpus: sample ×{args.repeat} = {clips} clips (distinct copies) in {shards} shards of ≤{args.shard_size}; "
          f"{os.cpu_count()} cores")
    print(f"local cluster start-up (not timed below): 1 worker {start1:.1f} s, 2 workers {start2:.1f} s")
    print(f"dask, 1 worker:  {dask1:7.2f} s  ({clips / dask1:6.1f} clips/s)")
    print(f"dask, 2 workers: {dask2:7.2f} s  ({clips / dask2:6.1f} clips/s)")
    print(f"2 ÷ 1 workers:   {speedup:.2f}×   target ≥ 1.7×   {'PASS' if speedup >= 1.7 else 'MISS'}")
    print(f"plain loop:      {plain_s:7.2f} s")
    print(f"prefect flow:    {flow_s:7.2f} s  (sequential runner)")
    print(f"flow ÷ plain:    {overhead:.3f}×  target ≤ 1.15×  {'PASS' if overhead <= 1.15 else 'MISS'}")


if __name__ == "__main__":
    main()
