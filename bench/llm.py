"""LLM-stage benchmark: the pipeline's LLM stage vs calling the same backend directly.

"Pipeline" = `tasks.regenerate.generate_with_qc` through `run_backend` (request cache, cold, and
response QC); "direct" = `backend.generate` on the same requests. Prints requests/s, output
tokens/s and the ratio (target ≥ 0.9×) for:
- the transformers backend on CPU (a tiny random-weight causal LM built here; QC off, since random
  text would be regenerated);
- the OpenAI-compatible backend against a stand-in for `vllm serve` on 127.0.0.1 (bench/fake_vllm.py:
  GPU-like capacity, 32 sequences at once for 50 ms each, realistic ~50-word answers that pass QC) at
  1, 64 and 512 in flight, the server pinned to its own core (a real server is another machine) and
  the client to the rest.
Each case also prints the client's CPU time per request, direct vs pipeline, and the pipeline's own CPU
per response with the backend's answers replayed instantly (deterministic, unlike the ratio).

    .venv/bin/python bench/llm.py
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# The stand-in for `vllm serve` (bench/fake_vllm.py): 32 sequences at once, 50 ms each, so at most
# 640 responses/s (about twelve H100s' worth of an 8B model), the rest queued as vLLM queues them.
MAX_NUM_SEQS = 32
STEP_S = 0.05


def prepared_requests(config: Any, n: int, workdir: Path) -> list[Any]:
    """n prepared clips (the sample corpus, cycled, each a distinct request id and seed)."""
    from tasks.describe import load_bins
    from tasks.features.models import load_models
    from tasks.ingest import iter_refs, load_clip
    from tasks.pipeline import prepare_batch
    from tasks.tally import ShardTally

    clips = [load_clip(ref, config.sources) for ref in iter_refs(config.sources)]
    base = prepare_batch(clips, config, load_bins(None), ShardTally(), load_models(config.features))
    out = []
    for i in range(n):
        p = base[i % len(base)]
        request = p.request.model_copy(update={"id": f"{p.request.id}#{i}", "seed": i})
        out.append(dataclasses.replace(p, request=request))
    return out


def tokens(results: list[Any]) -> int:
    return sum((r.generation.completion_tokens or 0) for r in results if hasattr(r, "generation"))


Run = tuple[float, float, list[Any]]  # (wall seconds, client CPU seconds, results)


def spread(runs: list[Run]) -> str:
    """Fastest–slowest of a case's runs: on a shared machine the noise can exceed the effect."""
    times = sorted(r[0] for r in runs)
    return f"{times[0]:.2f}–{times[-1]:.2f}"


class Replay:
    """Answers at once with responses recorded from the real backend, reporting each as it
    "finishes" like the OpenAI-compatible backend: what the pipeline then spends is its own work."""

    supports_on_result = True

    def __init__(self, config: Any, answers: list[Any]) -> None:
        self.config, self.name = config, config.backend
        self.by_id = {a.id: a for a in answers}

    def model_info(self) -> dict[str, Any]:
        return {"name": self.config.model, "revision": self.config.revision}

    def preflight(self) -> None:
        """Nothing to check: the answers are already here."""

    def generate(self, requests: Sequence[Any], on_result: Any = None) -> list[Any]:
        out = [self.by_id[r.id] for r in requests]
        for i, res in enumerate(out):
            if on_result is not None:
                on_result(i, res)
        return out


def own_cpu_ms(config: Any, prepared: list[Any], store: Any, answers: list[Any], rounds: int = 5) -> float:
    """The pipeline's own client CPU per response (request cache + QC), with the backend's answers
    replayed instantly: deterministic where the throughput ratio is at the mercy of the machine."""
    from tasks.llm.cache import CachedBackend
    from tasks.regenerate import generate_with_qc

    samples = []
    for r in range(rounds):
        replay = Replay(config.llm, answers)
        backend = CachedBackend(replay, store, f"bench/_staging/own-{time.time_ns()}-{r}", config=config.llm)
        c0 = time.process_time()
        generate_with_qc(prepared, backend, config, Counter())
        backend.close()
        c1 = time.process_time()
        replay.generate([p.request for p in prepared])
        samples.append((c1 - c0) - (time.process_time() - c1))
    return 1000 * sorted(samples)[rounds // 2] / len(prepared)


def measure(config: Any, prepared: list[Any], store: Any, label: str, rounds: int = 5) -> float:
    """Median of `rounds` alternating direct / pipeline runs (a fresh cache prefix each pipeline run),
    so a passing hiccup of the shared 2 cores lands in one sample, not in the ratio."""
    from tasks.llm import make_backend
    from tasks.pipeline import run_backend
    from tasks.regenerate import generate_with_qc
    from tasks.run import RunContext

    direct_backend = make_backend(config.llm)
    direct_backend.generate([p.request for p in prepared[:2]])  # warm-up (model load, connections)
    requests = [p.request for p in prepared]

    def piped_backend() -> Any:
        ctx = RunContext(run_id="bench", staging=f"bench/_staging/{label}-{time.time_ns()}", config_hash="bench",
                         pipeline_version="bench", bins_version="bench", extractor_versions={})
        return run_backend(config, store, ctx)

    warm = [dataclasses.replace(p, request=p.request.model_copy(update={"id": f"warm-{i}", "seed": 10**6 + i}))
            for i, p in enumerate(prepared[:2])]
    warm_backend = piped_backend()
    generate_with_qc(warm, warm_backend, config, Counter())  # warm-up, as for direct (threads, connections)
    warm_backend.close()

    def timed(call: Any) -> Run:
        t0, c0 = time.perf_counter(), time.process_time()
        out = call()
        return time.perf_counter() - t0, time.process_time() - c0, out

    def piped_run() -> Run:
        backend = piped_backend()
        try:
            return timed(lambda: generate_with_qc(prepared, backend, config, Counter()))
        finally:
            backend.close()  # as a shard task does: its cache writer threads end with it

    direct_runs: list[Run] = []
    piped_runs: list[Run] = []
    for r in range(rounds):
        for kind in (("direct", "pipeline") if r % 2 == 0 else ("pipeline", "direct")):
            if kind == "direct":
                direct_runs.append(timed(lambda: direct_backend.generate(requests)))
            else:
                piped_runs.append(piped_run())
    direct_s, direct_cpu, direct = sorted(direct_runs, key=lambda x: x[0])[rounds // 2]
    piped_s, piped_cpu, piped = sorted(piped_runs, key=lambda x: x[0])[rounds // 2]
    n = len(prepared)
    ok_direct = sum(1 for r in direct if hasattr(r, "text"))
    ok_piped = sum(1 for r in piped if hasattr(r, "text"))
    ratio = (n / piped_s) / (n / direct_s)
    print(f"{label:34s} direct {n / direct_s:8.1f} req/s {tokens(direct) / direct_s:9.1f} tok/s ({ok_direct}/{n} ok)"
          f" | pipeline {n / piped_s:8.1f} req/s {tokens(piped) / piped_s:9.1f} tok/s ({ok_piped}/{n} ok)"
          f" | {ratio:.3f}×  {'PASS' if ratio >= 0.9 else 'MISS'} (≥ 0.9×, median of {rounds})"
          f" | client CPU {1000 * direct_cpu / n:.2f} vs {1000 * piped_cpu / n:.2f} ms/request"
          f" | runs {spread(direct_runs)} s direct, {spread(piped_runs)} s pipeline")
    if all(hasattr(r, "text") for r in direct):
        print(f"{'':34s} pipeline's own CPU (cache + QC, answers replayed): "
              f"{own_cpu_ms(config, prepared, store, direct):.3f} ms/response")
    return ratio


def main() -> None:
    from storage.objectstore import LocalStore
    from tests.support.datasets_support import sample_config
    from tests.support.tiny_models import build_tiny_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = LocalStore(work / "store")
        model = build_tiny_causal_lm(work / "tiny-lm")
        import torch

        # One intra-op thread: with two, OpenMP's spinning threads and the other core's load made
        # identical runs of the tiny model differ by ±20%, more than the difference measured here.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        config = sample_config(str(work / "out"), "bench", workdir=work, overrides=[
            "llm.backend=transformers", f"llm.model={model}", "llm.device=cpu", "llm.max_tokens=16",
            "llm.temperature=1.0", "llm.concurrency=16", "llm.qc.enabled=false"])
        # The server (below) gets the last core and this client the others, as a real server would be
        # another machine; the in-process model runs on the client's cores too, pinned, since a thread
        # wandering between cores made identical runs differ more than what is measured here.
        cores = sorted(os.sched_getaffinity(0))
        server_cores, client_cores = (cores[-1:], cores[:-1]) if len(cores) > 1 else (cores, cores)
        os.sched_setaffinity(0, client_cores)
        prepared = prepared_requests(config, 384, work)
        measure(config, prepared, store, "transformers (tiny LM, CPU, 16/batch, 1 thread)", rounds=9)

        torch.set_num_threads(threads)

        # The server runs in its own process, as a real one would: in this process it would compete
        # with the client for the GIL and the pipeline's extra work would slow the server down too.
        # On its own core: otherwise the client's own work (cache, QC) is taken out of the server's
        # CPU, and the ratio measures 2 shared cores, not the pipeline.
        server = subprocess.Popen([sys.executable, str(REPO / "bench" / "fake_vllm.py"),
                                   "--cores", ",".join(map(str, server_cores)), "--max-num-seqs", str(MAX_NUM_SEQS),
                                   "--step-s", str(STEP_S)],
                                  stdout=subprocess.PIPE, text=True, cwd=str(REPO), start_new_session=True)
        print(f"server on core(s) {server_cores}, client on core(s) {client_cores}")
        try:
            assert server.stdout is not None
            base_url = server.stdout.readline().strip()
            for in_flight, n in ((1, 64), (64, 1024), (512, 1024)):
                config = sample_config(str(work / "out"), "bench", workdir=work, overrides=[
                    "llm.backend=openai", f"llm.base_url={base_url}", "llm.model=fake-served-model",
                    f"llm.concurrency={in_flight}", "llm.timeout_s=30"])
                prepared = prepared_requests(config, n, work)
                measure(config, prepared, store, f"openai-compatible, {in_flight} in flight", rounds=9)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
    print(f"note: the stand-in server runs {MAX_NUM_SEQS} requests at once for {1000 * STEP_S:.0f} ms each"
          f" (at most {MAX_NUM_SEQS / STEP_S:.0f} responses/s) and queues the rest, as vLLM does; requests/s x"
          " client CPU per request is the share of the client's core in use")


if __name__ == "__main__":
    main()
