"""Endpoint slots: a cap on the requests in flight at one LLM endpoint, shared by every worker.

`llm.endpoint_limit` asks for it; tasks/ decides where it applies (one limit per replica base URL)
and flows/ provides how it is held: the Prefect global concurrency limit `llm-endpoint:<host:port>`
(flows/endpoint_limits.py), installed for every process that runs the flow's tasks by
flows/runners.py, as the GPU gate is. The OpenAI-compatible backend takes a `SlotProvider` (its
own, or the installed one) and never imports Prefect.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class SlotPool(Protocol):
    """One generate() call's share of the limits: a slot per request in flight, by replica."""

    @property
    def leases(self) -> int:
        """Acquisitions made so far (for benchmarks and tests)."""
        ...

    def slot(self, base_url: str) -> AbstractAsyncContextManager[None]:
        """Held while one request to `base_url` is in flight; raises LLMUnavailable when the limit
        cannot be held at all (a request never goes out without its slot)."""
        ...

    async def aclose(self) -> None:
        """Give every slot back (the end of the call)."""
        ...


class SlotProvider(Protocol):
    async def prepare(self, base_urls: Sequence[str], limit: int) -> None:
        """Create each replica's limit, or set it to `limit` (pre-flight); LLMUnavailable if it cannot."""
        ...

    def open(self, base_urls: Sequence[str], limit: int) -> SlotPool:
        """The pool for one generate() call."""
        ...


_installed: SlotProvider | None = None


def install_slot_provider(provider: SlotProvider | None) -> None:
    """Make `provider` hold `llm.endpoint_limit` for the backends of this process (None: remove it)."""
    global _installed
    _installed = provider


def installed_slot_provider() -> SlotProvider | None:
    return _installed
