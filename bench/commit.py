"""Commit benchmark: wall time and bytes moved by `commit_version` at 1× and 8× data, on a real
SeaweedFS S3 server on 127.0.0.1 (target: 8×/1× wall-time ratio ≤ 1.2×).

For each size the pipeline runs once on a distinct-audio corpus (bench/pipeline.py
`repeated_manifest`: each copy new audio, so the shards are the size real data would be), with a
fixed shard size (8× data = 8× shards). Its commit is timed alone, through a wrapper that counts
what every store call moves: bytes put, bytes copied (server-side), bytes read, and requests; the
same data keys are then committed `--rounds` more times (as other runs, 1× and 8× alternating) and
each size's best time is kept.
The same staged shards are then also committed the way the code before data keys did (staged
under `_staging/<run>/shards/`: copied into the version prefix and each copy re-read), for the
before/after comparison on the same data.

    .venv/bin/python bench/commit.py [--repeat 2] [--shard-size 5] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_RATIO = 1.2


class Meter:
    """Counts bytes and requests of one store's calls while `on` (patched onto the instance)."""

    def __init__(self, store: Any) -> None:
        self.on = False
        self.put = self.copy = self.get = self.requests = 0
        self._wrap(store)

    def _wrap(self, store: Any) -> None:
        put_bytes, put_file, copy = store.put_bytes, store.put_file, store.copy
        get_with_etag, iter_bytes, size, list_info = store.get_with_etag, store.iter_bytes, store.size, store.list_info

        def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                self.requests += self.on
                return fn(*args, **kwargs)
            return call

        def p_bytes(key: str, data: bytes, **kw: Any) -> str:
            self.put += len(data) * self.on
            return counted(put_bytes)(key, data, **kw)

        def p_file(key: str, path: Any, **kw: Any) -> None:
            self.put += os.path.getsize(path) * self.on
            counted(put_file)(key, path, **kw)

        def cp(src: str, dst: str) -> None:
            self.copy += size(src) * self.on
            counted(copy)(src, dst)

        def g(key: str) -> tuple[bytes, str]:
            data, etag = counted(get_with_etag)(key)
            self.get += len(data) * self.on
            return data, etag

        def it(key: str, chunk_size: int = 8 * 1024 * 1024) -> Iterator[bytes]:
            for chunk in counted(iter_bytes)(key, chunk_size):
                self.get += len(chunk) * self.on
                yield chunk

        store.put_bytes, store.put_file, store.copy = p_bytes, p_file, cp
        store.get_with_etag, store.iter_bytes = g, it
        store.size, store.list_info = counted(size), counted(list_info)

    @property
    def moved(self) -> int:
        return self.put + self.copy + self.get


def run_size(server: Any, work: Path, repeat: int, shard_size: int) -> dict[str, Any]:
    """Run the pipeline once on `repeat` distinct copies of the sample; time and meter its commit,
    then commit the same shards the old way (copy + re-read)."""
    from bench.pipeline import repeated_manifest
    from flows.generate import run_plain
    from schemas.config import parse_config
    from storage.layout import staging_prefix
    from storage.versions import commit_version
    from tasks import publish

    manifest_path = repeated_manifest(work / f"corpus-x{repeat}", repeat)
    root = server.root(f"bench-commit-{uuid.uuid4().hex[:8]}")
    config = parse_config({
        "sources": [{"path": str(manifest_path), "dataset": "bench", "allowed_roots": [str(manifest_path.parent)]}],
        "output": {"root": root, "dataset": "commit", "shard_size": shard_size},
        "s3": {"endpoint_url": server.endpoint_url, "region": server.region, "addressing_style": "path"},
        "runner": "sequential",
    }, environ={})
    seen: dict[str, Any] = {}
    real = publish.commit_version

    def timed(store: Any, **kw: Any) -> Any:
        meter = Meter(store)
        meter.on = True
        t0 = time.perf_counter()
        try:
            return real(store, **kw)
        finally:
            seen.update(seconds=time.perf_counter() - t0, meter=meter, store=store, kw=kw)
            meter.on = False

    publish.commit_version = timed  # type: ignore[assignment]
    try:
        manifest = run_plain(config)
    finally:
        publish.commit_version = real  # type: ignore[assignment]
    store, kw, meter = seen["store"], seen["kw"], seen["meter"]
    data_bytes = sum(s.bytes for s in [*manifest.shards, *manifest.quarantine])

    # The old protocol on the same shards: staged under _staging/…/shards/, copied and re-verified.
    staging = staging_prefix("commit", "run-old-layout")
    legacy = []
    for i, info in enumerate(kw["staged_shards"]):
        key = f"{staging}/shards/train-{i:05d}.parquet"
        store.copy(info.path, key)
        legacy.append(info.model_copy(update={"path": key}))
    old_meter = Meter(store)
    old_meter.on = True
    t0 = time.perf_counter()
    old = commit_version(store, **{**kw, "staged_shards": legacy, "staged_quarantine": [],
                                   "lineage": {**kw["lineage"], "run_id": "run-old-layout"},
                                   "stats": kw["stats"].model_copy(update={"quarantined": 0})})
    old_seconds = time.perf_counter() - t0
    old_meter.on = False
    assert old.layout == 1 and manifest.layout == 2
    return {"repeat": repeat, "rows": manifest.stats.rows, "shards": len(manifest.shards), "data_bytes": data_bytes,
            "seconds": seen["seconds"], "put": meter.put, "copy": meter.copy, "get": meter.get,
            "requests": meter.requests, "moved": meter.moved, "old_seconds": old_seconds,
            "old_moved": old_meter.moved, "old_requests": old_meter.requests, "store": store, "kw": kw}


def recommit(sizes: list[dict[str, Any]], rounds: int) -> None:
    """Commit each size's data keys again `rounds` times (as other runs), the sizes alternating so
    that machine noise hits both alike; keep each size's best time."""
    from storage.versions import commit_version

    for k in range(rounds):
        for r in sizes:
            t0 = time.perf_counter()
            again = commit_version(r["store"], **{**r["kw"], "lineage": {**r["kw"]["lineage"], "run_id": f"run-round-{k}"}})
            r["seconds"] = min(r["seconds"], time.perf_counter() - t0)
            assert again.layout == 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="copies of the sample at 1× (8× uses 8 times as many)")
    parser.add_argument("--shard-size", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10, help="extra commits of the same shards (best time kept)")
    args = parser.parse_args()

    from bench.read import start_seaweedfs

    with tempfile.TemporaryDirectory(prefix="bench-commit-") as tmp:
        work = Path(tmp)
        weed = start_seaweedfs(work)
        server = weed.info
        os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                          AWS_REGION=server.region)
        try:
            small = run_size(server, work, args.repeat, args.shard_size)
            large = run_size(server, work, 8 * args.repeat, args.shard_size)
            recommit([small, large], args.rounds)
        finally:
            weed.stop()
    for r in (small, large):
        print(f"×{r['repeat']:>3}: {r['rows']} rows, {r['shards']} shards, {r['data_bytes'] / 1e6:.2f} MB of shards | "
              f"commit {r['seconds'] * 1e3:7.1f} ms, moved {r['moved']:,} B (put {r['put']:,}, copy {r['copy']:,}, "
              f"get {r['get']:,}), {r['requests']} requests | old protocol {r['old_seconds'] * 1e3:7.1f} ms, "
              f"moved {r['old_moved']:,} B, {r['old_requests']} requests")
    ratio = large["seconds"] / small["seconds"]
    old_ratio = large["old_seconds"] / small["old_seconds"]
    print(f"commit wall time 8×/1×: {ratio:.2f}× (target ≤ {TARGET_RATIO}×: {'PASS' if ratio <= TARGET_RATIO else 'FAIL'}); "
          f"old protocol {old_ratio:.2f}×")
    print(f"bytes moved 8×/1×: {large['moved'] / small['moved']:.2f}× (metadata only: {large['moved']:,} B vs "
          f"{large['data_bytes']:,} B of shards); old protocol {large['old_moved'] / small['old_moved']:.2f}×")


if __name__ == "__main__":
    main()
