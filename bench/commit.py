"""Commit benchmark: wall time and bytes moved by `commit_version` at 1× and 8× data, on a real
SeaweedFS S3 server on 127.0.0.1 (target: 8×/1× wall-time ratio ≤ 1.2×); and a regeneration run that
changes only the LLM settings against the 8× first run: bytes it writes (target < 5% of the first
run's) and CPU seconds outside the LLM stage (target < 10%).

For each size the pipeline runs once on a distinct-audio corpus (bench/pipeline.py
`repeated_manifest`: each copy new audio, so the shards are the size real data would be), with a
fixed shard size (8× data = 8× shards). Its commit is timed alone, through a wrapper that counts
what every store call moves: bytes put, bytes copied (server-side), bytes read, and requests; the
same data keys are then committed `--rounds` more times (as other runs, 1× and 8× alternating) and
each size's best time is kept.
Regeneration: the 8× config with other LLM sampling settings (a new run, a new version) runs on the
same root; bytes written = the sizes of the objects that appear or change under the root during the
run (listed before and after), CPU = the process's CPU time over the run minus the CPU time spent
inside the LLM stage (`generate_with_qc`, wrapped), for both runs alike.
The same staged shards are then also committed the way the code before data keys did (staged
under `_staging/<run>/shards/`: copied into the version prefix and each copy re-read), for the
before/after comparison on the same data.

    .venv/bin/python bench/commit.py [--repeat 2] [--shard-size 5] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
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
REGEN_BYTES = 0.05
REGEN_CPU = 0.10


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
        manifest, _ = costed_run(config)
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
            "old_moved": old_meter.moved, "old_requests": old_meter.requests, "store": store, "kw": kw,
            "config": config}


def _objects(store: Any) -> dict[str, tuple[int, float]]:
    return {o.key: (o.size, o.mtime) for o in store.list_info("")}


def costed_run(config: Any) -> tuple[Any, dict[str, float]]:
    """run_plain with what it costs: bytes written under the root, CPU seconds in and outside the LLM stage."""
    from flows.generate import run_plain
    from tasks import pipeline
    from tasks.run import run_context, run_store

    store = run_store(config)
    before = _objects(store)
    llm_cpu = [0.0]
    real = pipeline.generate_with_qc

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            llm_cpu[0] += time.process_time() - t0

    pipeline.generate_with_qc = timed  # type: ignore[assignment]
    cpu0 = time.process_time()
    try:
        manifest = run_plain(config)
    finally:
        pipeline.generate_with_qc = real  # type: ignore[assignment]
    cpu = time.process_time() - cpu0
    after = _objects(store)
    written = sum(size for key, (size, tag) in after.items() if before.get(key) != (size, tag))
    stages: dict[str, float] = {}
    ctx = run_context(config)
    for key in store.list(ctx.layout.markers):
        for stage, seconds in json.loads(store.get_bytes(key))["stage_seconds"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return manifest, {"written": written, "cpu": cpu, "llm_cpu": llm_cpu[0], "other_cpu": cpu - llm_cpu[0],
                      "stages": sum(v for k, v in stages.items() if k != "llm"), "by_stage": stages}


def regenerate(r: dict[str, Any], shard_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A first run of the large corpus at `shard_size`, then the same with other LLM sampling
    settings (a new run and version on the same root): what each costs."""
    config = r["config"]
    first_config = config.model_copy(update={"output": config.output.model_copy(update={
        "dataset": "regen", "shard_size": shard_size})})
    first_manifest, first = costed_run(first_config)
    llm = config.llm.model_copy(update={"temperature": 0.3, "top_p": 0.8, "seed": config.llm.seed + 1})
    manifest, cost = costed_run(first_config.model_copy(update={"llm": llm}))
    assert manifest.stats.rows == first_manifest.stats.rows == r["rows"]
    assert manifest.lineage.run_id != first_manifest.lineage.run_id
    return first, cost


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
    parser.add_argument("--regen-shard-size", type=int, default=100,
                        help="shard size of the regeneration comparison (a run's usual size, not the commit test's)")
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
            first, regen = regenerate(large, args.regen_shard_size)
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
    written, stages = regen["written"] / first["written"], regen["stages"] / first["stages"]
    for name, c in (("first run", first), ("regeneration", regen)):
        print(f"{name} ×{large['repeat']} (shards of {args.regen_shard_size}): wrote {c['written']:,} B | stage "
              f"seconds outside the LLM stage {c['stages']:.2f} s ("
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(c["by_stage"].items()) if v >= 0.005)
              + f") | process CPU {c['cpu']:.2f} s, of it {c['llm_cpu']:.2f} s in the LLM stage")
    print(f"regeneration (other LLM settings) bytes written: {written:.1%} of the first run's (target < "
          f"{REGEN_BYTES:.0%}: {'PASS' if written < REGEN_BYTES else 'FAIL'}); seconds in the non-LLM stages: "
          f"{stages:.1%} (target < {REGEN_CPU:.0%}: {'PASS' if stages < REGEN_CPU else 'FAIL'}); whole-process CPU "
          f"outside the LLM stage (planning, commit, imports done): {regen['other_cpu'] / first['other_cpu']:.1%}")


if __name__ == "__main__":
    main()
