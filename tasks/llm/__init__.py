"""LLM stage: backends that turn seed descriptions + instructions into responses, and response QC.

`BACKENDS` is the table of backends by `llm.backend` name (as tasks/ingest's `ADAPTERS` is of
source layouts); each entry imports its module only when chosen, so a `rules` run imports no
aiohttp, torch or vLLM. The interface every backend implements is `tasks.llm.base.LLMBackend`.
"""

from __future__ import annotations

from collections.abc import Callable

from schemas.config import LLMConfig
from tasks.llm.base import LLMBackend, LLMRequest, LLMResult
from tasks.llm.messages import build_messages

__all__ = ["BACKENDS", "LLMBackend", "LLMRequest", "LLMResult", "build_messages", "make_backend"]


def _rules(config: LLMConfig) -> LLMBackend:
    from tasks.llm.rules import RulesBackend

    return RulesBackend(config)


def _openai(config: LLMConfig) -> LLMBackend:
    from tasks.llm.openai_compat import OpenAICompatBackend

    return OpenAICompatBackend(config)


def _transformers(config: LLMConfig) -> LLMBackend:
    from tasks.llm.transformers_backend import TransformersBackend

    return TransformersBackend(config)


def _vllm(config: LLMConfig) -> LLMBackend:
    from tasks.llm.vllm_engine import VLLMEngineBackend

    return VLLMEngineBackend(config)


# llm.backend → a constructor (a config alias such as `template` is resolved by LLMConfig.backend_name).
BACKENDS: dict[str, Callable[[LLMConfig], LLMBackend]] = {
    "rules": _rules,  # no model: sentences from the seed's words (demos, tests, CPU-only runs)
    "openai": _openai,  # any OpenAI-compatible HTTP endpoint, e.g. `vllm serve`
    "transformers": _transformers,  # in-process transformers (small models, CPU or one GPU)
    "vllm": _vllm,  # in-process vLLM engine (GPUs of this machine)
}


def make_backend(config: LLMConfig) -> LLMBackend:
    """The backend named by `config.backend` (constructed only: no model is loaded, no endpoint called)."""
    factory = BACKENDS.get(config.backend_name)
    if factory is None:
        raise ValueError(f"unknown llm.backend {config.backend!r}; allowed: {', '.join(map(repr, BACKENDS))}")
    return factory(config)
