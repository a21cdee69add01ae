"""Pipeline benchmark: Prefect flow vs the same stage functions in a plain loop, and memory growth.

Prints ratios measured in one run (targets: flow/plain ≤ 1.15×; peak RSS at 10× corpus < 1.2× of
1×), and what a shard costs per audio second with the corpus's copies identical and distinct.
The corpus is the sample repeated, each copy made distinct audio (`repeated_manifest`): identical
clips would compress away in Parquet and flatter every I/O figure. The Prefect API is started before timing (a temporary local server), so the ratio measures
per-task orchestration overhead, not server start-up.

    .venv/bin/python bench/pipeline.py [--repeat 20] [--shard-size 25]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.manifest import Manifest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "examples" / "sample_corpus"


NOISE_DBFS = -80.0  # RMS of the noise added to each copy: a few 16-bit steps, well under the recordings' own floor
GAIN_DB = 1.5  # each copy's gain is drawn from ±this


def distinct_copy(src: Path, dest: Path, copy: int, clip: int) -> None:
    """`src` with seeded noise and a small gain change (fixed by copy and clip index) → `dest`, same format.

    Identical clips next to each other compress away in Parquet (about 0.7 KB per audio second
    instead of ~20 KB): a corpus of repeats would make every I/O figure many times too kind.
    """
    import numpy as np
    import soundfile as sf

    if dest.exists():  # deterministic content: an earlier call in this folder wrote the same bytes
        return
    info = sf.info(str(src))
    samples, sr = sf.read(str(src), dtype="float32", always_2d=True)
    rng = np.random.default_rng([copy, clip])
    gain = 10 ** (rng.uniform(-GAIN_DB, GAIN_DB) / 20)
    noise = rng.standard_normal(samples.shape, dtype=np.float32) * np.float32(10 ** (NOISE_DBFS / 20))
    out = np.clip(samples * np.float32(gain) + noise, -1.0, 1.0)
    subtype = info.subtype if sf.check_format(info.format, info.subtype) else None
    tmp = dest.with_name(f".{dest.name}.tmp")
    sf.write(str(tmp), out, sr, format=info.format, subtype=subtype)
    tmp.replace(dest)


def repeated_manifest(dest: Path, repeat: int, *, distinct: bool = True) -> Path:
    """The sample corpus listed `repeat` times with distinct ids; with `distinct` (the default) each
    copy is new audio (`distinct_copy`, written under dest/audio/), otherwise the same files again."""
    from concurrent.futures import ThreadPoolExecutor

    lines = [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines()]
    out = dest / f"manifest_x{repeat}{'' if distinct else '_same'}.jsonl"
    audio = dest / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    jobs = []
    with out.open("w") as f:
        for r in range(repeat):
            for k, rec in enumerate(lines):
                src = SAMPLE / rec["path"]
                path = audio / f"{src.stem}__r{r:04d}{src.suffix}" if distinct else src
                if distinct:
                    jobs.append((src, path, r, k))
                f.write(json.dumps({**rec, "id": f"{rec['id']}__r{r:04d}", "path": str(path)}) + "\n")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # libsndfile releases the GIL
        list(pool.map(lambda job: distinct_copy(*job), jobs))
    return out


def bytes_per_audio_second(manifest: Manifest) -> float:
    """What a committed version's shards and the audio files they name cost per second of audio (bytes)."""
    from storage.card import stored_bytes

    return stored_bytes(manifest) / (manifest.stats.audio_hours * 3600)


def corpus_cost(dest: Path, repeat: int, shard_size: int) -> dict[str, float]:
    """KB per audio second of the shards: the sample once, repeated as identical copies, as distinct copies."""
    from flows.generate import run_plain

    out: dict[str, float] = {}
    for name, manifest, n in (("sample ×1 (original clips)", repeated_manifest(dest, 1, distinct=False), 1),
                              (f"×{repeat} identical copies", repeated_manifest(dest, repeat, distinct=False), repeat),
                              (f"×{repeat} distinct copies", repeated_manifest(dest, repeat), repeat)):
        config = make_config(manifest, dest / f"cost-{len(out)}", "cost", min(shard_size, 10 * n))
        out[name] = bytes_per_audio_second(run_plain(config)) / 1e3
    return out


def print_corpus_cost(cost: dict[str, float]) -> None:
    for name, kb in cost.items():
        print(f"shard bytes per audio second, {name}: {kb:6.1f} KB")


def make_config(manifest: Path, root: Path, dataset: str, shard_size: int):
    from schemas.config import parse_config

    return parse_config({
        "sources": [{"path": str(manifest), "dataset": "bench", "allowed_roots": [str(SAMPLE), str(manifest.parent)]}],
        "output": {"root": str(root), "dataset": dataset, "shard_size": shard_size},
        "runner": "sequential",
    }, environ={})


def plain_loop(config) -> int:
    """Exactly the flow's stage functions, called in order without Prefect."""
    from flows.generate import run_plain

    return run_plain(config).stats.rows


def rss_child(repeat: int, shard_size: int) -> None:
    """Run in a fresh process: the plain pipeline on the corpus × repeat, then print peak RSS (KiB)."""
    import flows.generate  # noqa: F401 - import everything first: the baseline is the loaded program

    with tempfile.TemporaryDirectory() as tmp:
        manifest = repeated_manifest(Path(tmp), repeat)  # the corpus's files are written before measuring
        baseline = _status_kib("VmRSS")
        _reset_peak_rss()  # so the peak below is reached while processing, not while importing
        rows = plain_loop(make_config(manifest, Path(tmp) / "out", "rss", shard_size))
    peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "peak_rss_kib": peak, "baseline_kib": baseline}))


def _status_kib(field: str) -> int:
    """A /proc/self/status memory field in KiB (Linux); 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss(repeat: int, shard_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(repeat), "--shard-size", str(shard_size)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=150, help="corpus repetitions for the timing run")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.shard_size)
        return

    from prefect.testing.utilities import prefect_test_harness

    from flows.generate import run_generate

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=90):
        manifest = repeated_manifest(Path(tmp), args.repeat)
        clips = 10 * args.repeat
        # Warm-up (imports, caches, first flow registration) outside the timed region.
        run_generate(make_config(repeated_manifest(Path(tmp), 1), Path(tmp) / "warm", "warm", args.shard_size))
        plain_loop(make_config(repeated_manifest(Path(tmp), 1), Path(tmp) / "warm2", "warm", args.shard_size))

        t0 = time.perf_counter()
        rows_plain = plain_loop(make_config(manifest, Path(tmp) / "plain", "bench", args.shard_size))
        plain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = run_generate(make_config(manifest, Path(tmp) / "flow", "bench", args.shard_size))
        flow_s = time.perf_counter() - t0
        cost = corpus_cost(Path(tmp) / "cost", min(args.repeat, 20), args.shard_size)
    assert rows_plain == summary.rows == clips, (rows_plain, summary.rows, clips)
    shards = (clips + args.shard_size - 1) // args.shard_size
    ratio = flow_s / plain_s
    print(f"corpus: sample ×{args.repeat} = {clips} clips (distinct copies: seeded noise and gain), "
          f"{shards} shards of ≤{args.shard_size}, sequential")
    print_corpus_cost(cost)
    print(f"plain loop:   {plain_s:7.2f} s  ({clips / plain_s:6.1f} clips/s)")
    print(f"prefect flow: {flow_s:7.2f} s  ({clips / flow_s:6.1f} clips/s)")
    print(f"flow / plain: {ratio:.3f}×   target ≤ 1.15×   {'PASS' if ratio <= 1.15 else 'MISS'}")

    one = peak_rss(1, 1000)  # one shard holds the whole corpus: the writer must stream
    ten = peak_rss(10, 1000)
    growth = ten["peak_rss_kib"] / one["peak_rss_kib"]
    for name, r in (("×1 corpus: ", one), ("×10 corpus:", ten)):
        print(f"peak RSS {name} {r['peak_rss_kib'] / 1024:7.1f} MiB ({r['rows']} rows; "
              f"{(r['peak_rss_kib'] - r['baseline_kib']) / 1024:.1f} MiB above the loaded program's RSS)")
    print(f"RSS growth 10×/1×: {growth:.3f}×   target < 1.2×   {'PASS' if growth < 1.2 else 'MISS'}")


if __name__ == "__main__":
    main()
