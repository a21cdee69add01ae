"""A cooperative stop for the whole process: SIGTERM/SIGINT ask the run to stop, the work obeys.

A signal cannot stop a worker thread, and a flow that only dies in its main thread leaves shard
threads finishing (or hanging on) their LLM requests. So the CLI's handler only sets this flag;
every shard checks it before each clip and batch, and the LLM clients cancel their requests in
flight within a poll interval. An abandoned shard writes no marker (its temp file is discarded),
so staging stays consistent and the next run redoes exactly the unfinished shards.
"""

from __future__ import annotations

import asyncio
import signal
import threading

_stop = threading.Event()
_signum: int | None = None
POLL_S = 0.1


class RunInterrupted(RuntimeError):
    """The run was asked to stop (SIGTERM/SIGINT): unfinished shards are abandoned, never marked done."""

    def __init__(self, where: str = "") -> None:
        name = signal.Signals(_signum).name if _signum else "a stop request"
        super().__init__(f"interrupted by {name}" + (f" ({where})" if where else ""))
        self.signum = _signum


def request_stop(signum: int | None = None) -> None:
    global _signum
    if not _stop.is_set():
        _signum = signum
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_signal() -> int | None:
    """The signal that asked to stop (None if none did)."""
    return _signum if _stop.is_set() else None


def check_stop(where: str = "") -> None:
    """Raise RunInterrupted once a stop was requested (called between clips and batches)."""
    if _stop.is_set():
        raise RunInterrupted(where)


def reset() -> None:
    """Forget a stop request (tests; a CLI process runs once)."""
    global _signum
    _stop.clear()
    _signum = None


async def until_stopped() -> None:
    """Return once a stop is requested: race it against a batch of requests to abandon them."""
    while not _stop.is_set():
        await asyncio.sleep(POLL_S)
