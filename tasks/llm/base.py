"""The LLM stage's contract: one request per clip in, one result (or a quarantine) per clip out.

A backend turns a batch of `LLMRequest`s into the same number of `LLMResult | QuarantineError`,
in the same order. One bad request never raises and is never dropped: it becomes a
`QuarantineError(Stage.llm, ...)` whose message names the clip id and the last error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

from schemas.config import LLMConfig
from schemas.records import Generation, Message, QuarantineError


class LLMUnavailable(RuntimeError):
    """The endpoint cannot serve this run at all: fail the run up front, quarantine nothing."""


class LLMRequest(BaseModel):
    """Everything a backend may use for one clip. `messages` is exactly what is sent."""

    id: str
    messages: list[Message]
    seed: int
    attributes: dict[str, str] = Field(default_factory=dict)  # display label -> word
    transcript: str | None = None
    duration_s: float


class LLMResult(BaseModel):
    id: str
    text: str
    generation: Generation


@runtime_checkable
class LLMBackend(Protocol):
    name: str

    def model_info(self) -> dict[str, str | None]:
        """{"name": ..., "revision": ...} for the manifest."""
        ...

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMResult | QuarantineError]:
        """Same length and order as `requests`; never raises for one bad request."""
        ...

    def preflight(self) -> None:
        """Raise before any work if the backend cannot serve the run (unreachable, no model)."""
        ...


OnResult = Callable[[int, "LLMResult | QuarantineError"], None]


def generate_reporting(backend: LLMBackend, requests: Sequence[LLMRequest],
                       on_result: OnResult) -> list[LLMResult | QuarantineError]:
    """`backend.generate(requests)`, calling `on_result(index, result)` for each result: as each one
    finishes when the backend can report that (`supports_on_result`, e.g. the OpenAI-compatible
    client, on its event loop's thread), else for all of them once the batch is back.

    Work done in `on_result` (the request cache's write, response QC) then overlaps the requests
    still in flight instead of following the batch while the model server sits idle.
    """
    if getattr(backend, "supports_on_result", False):
        return backend.generate(requests, on_result=on_result)  # type: ignore[call-arg]
    results = backend.generate(requests)
    for i, res in enumerate(results):
        on_result(i, res)
    return results


def make_backend(config: LLMConfig) -> LLMBackend:
    """The backend named by `config.backend`."""
    if config.backend == "template":
        from tasks.llm.template import TemplateBackend

        return TemplateBackend(config)
    if config.backend == "openai":
        from tasks.llm.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(config)
    if config.backend == "transformers":
        from tasks.llm.transformers_backend import TransformersBackend

        return TransformersBackend(config)
    if config.backend == "vllm":
        from tasks.llm.vllm_engine import VLLMEngineBackend

        return VLLMEngineBackend(config)
    raise ValueError(f"unknown llm.backend {config.backend!r}; "
                     "allowed: 'template', 'openai', 'transformers', 'vllm'")
