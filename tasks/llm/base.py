"""The LLM stage's contract: one request per clip in, one result (or a quarantine) per clip out.

A backend subclasses `LLMBackend` and turns a batch of `LLMRequest`s into the same number of
`LLMResult | QuarantineError`, in the same order. One bad request never raises and is never dropped:
it becomes a `QuarantineError(Stage.llm, ...)` whose message names the clip id and the last error.
A backend that cannot serve the run at all raises `LLMUnavailable` (from `preflight`, before any clip).

This module imports no backend; backends are chosen by name in `tasks.llm.BACKENDS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from schemas.config import LLMConfig
from schemas.records import Generation, Message, QuarantineError


class LLMUnavailable(RuntimeError):
    """The endpoint cannot serve this run at all: fail the run up front, quarantine nothing."""


class LocalLLMUnavailable(LLMUnavailable, ValueError):
    """A local model or tokenizer setting that cannot serve the run; the message names the setting.

    An `LLMUnavailable` (the CLI reports it as a usage error before any work) and a `ValueError`.
    """


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


# on_result(index, result): told of each result of a generate() call, as it finishes where the backend
# can (the OpenAI-compatible client: on its event loop's thread), else once the batch is back.
OnResult = Callable[[int, "LLMResult | QuarantineError"], None]


def reported(results: list[LLMResult | QuarantineError],
             on_result: OnResult | None) -> list[LLMResult | QuarantineError]:
    """`results`, after telling `on_result` of each (a backend that finishes a batch all at once)."""
    if on_result is not None:
        for i, res in enumerate(results):
            on_result(i, res)
    return results


class LLMBackend(ABC):
    """An LLM backend. `generate` and `model_info` are the backend's own; the hooks have defaults."""

    name: str  # recorded as the rows' generation.backend
    config: LLMConfig | None = None  # the sampling settings it runs with (part of the request cache key)
    cacheable: bool = True  # False: the request cache passes it through (free, and keyed by more than the prompt)

    @abstractmethod
    def model_info(self) -> dict[str, str | None]:
        """{"name": ..., "revision": ...} for the manifest."""

    @abstractmethod
    def generate(self, requests: Sequence[LLMRequest],
                 on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        """Same length and order as `requests`; never raises for one bad request. `on_result(index,
        result)` is told of each result (see OnResult), so work on it (the request cache's write,
        response QC) overlaps the requests still in flight."""

    def preflight(self) -> None:
        """Raise LLMUnavailable before any work if the backend cannot serve the run (unreachable, no
        model). Default: nothing to check."""

    def render(self, request: LLMRequest) -> str | None:
        """The prompt text exactly as the model gets it, where the backend renders the chat template
        itself; None (the default) where the server does and we never see the text."""
        return None

    def close(self) -> None:
        """Release what the backend holds at the end of a shard. Default: nothing."""


def as_backend(backend: object) -> LLMBackend:
    """`backend` as an LLMBackend: itself, or, for an object that only has the interface's shape (a
    test double, a plugin written to the protocol), an adapter that gives it the default hooks."""
    return backend if isinstance(backend, LLMBackend) else _Adapted(backend)


class _Adapted(LLMBackend):
    """A duck-typed backend: `name`, `model_info()`, `generate(requests)` and `preflight()`; optional
    `close()`, `config`, and `supports_on_result = True` for a `generate(requests, on_result=...)`."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.name = str(getattr(backend, "name", type(backend).__name__))
        config = getattr(backend, "config", None)
        self.config = config if isinstance(config, LLMConfig) else None
        self._streams = bool(getattr(backend, "supports_on_result", False))

    def model_info(self) -> dict[str, str | None]:
        info: dict[str, str | None] = self.backend.model_info()
        return info

    def preflight(self) -> None:
        self.backend.preflight()

    def generate(self, requests: Sequence[LLMRequest],
                 on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        if self._streams and on_result is not None:
            return list(self.backend.generate(requests, on_result=on_result))
        return reported(list(self.backend.generate(requests)), on_result)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


def generate_reporting(backend: LLMBackend, requests: Sequence[LLMRequest],
                       on_result: OnResult) -> list[LLMResult | QuarantineError]:
    """`backend.generate(requests, on_result)`, for any backend (`as_backend`)."""
    return as_backend(backend).generate(requests, on_result)
