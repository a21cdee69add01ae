"""Which model stages of a run use a GPU, and the gate they pass through.

Shard tasks fan out over threads, processes or a cluster, but a GPU is shared: the flow hands the
pipeline a gate (a Prefect concurrency limit) that each GPU stage holds while it computes, so two
shards never run Whisper, a classifier or the local LLM on the same GPU at once. This module only
decides *which* stages are gated; it does not import Prefect.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache

from schemas.config import RunConfig

# gate(stage) -> context manager held while that stage computes one micro-batch.
StageGate = Callable[[str], AbstractContextManager[object]]

MODEL_STAGES = ("asr", "classify", "llm")


def no_gate(stage: str) -> AbstractContextManager[object]:
    return nullcontext()


@lru_cache(maxsize=1)
def cuda_devices() -> int:
    """GPUs torch sees on this machine (0 without torch or CUDA).

    Importing torch costs seconds, so only a config with a model stage on `auto` may ask: a run
    without model stages never imports it (tests/integration/test_local_server.py checks `sys.modules`)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _on_gpu(setting: str) -> bool:
    return setting == "cuda" or (setting == "auto" and cuda_devices() > 0)


def model_stages(config: RunConfig) -> set[str]:
    """The model stages this config runs at all (on any device)."""
    stages: set[str] = set()
    if config.features.asr.enabled:
        stages.add("asr")
    if config.features.classifiers:
        stages.add("classify")
    if config.llm.backend in ("transformers", "vllm"):
        stages.add("llm")
    return stages


def gpu_stages(config: RunConfig) -> set[str]:
    """The stages to gate: those on a GPU (`auto`), every model stage (`always`), or none."""
    gate = config.cluster.gpu_gate
    if gate == "never":
        return set()
    stages = model_stages(config)
    if gate == "always":
        return stages
    # Lazily, per configured stage: a disabled stage's `device: auto` must not count GPUs (import torch).
    on_gpu: dict[str, Callable[[], bool]] = {
        "asr": lambda: _on_gpu(config.features.asr.device),
        "classify": lambda: any(_on_gpu(c.device) for c in config.features.classifiers),
        "llm": lambda: config.llm.backend == "vllm" or _on_gpu(config.llm.device),
    }
    return {s for s in stages if on_gpu[s]()}
