"""The Prefect side of `llm.endpoint_limit`: each LLM replica's requests in flight, across every
worker, held as slots of the Prefect global concurrency limit `llm-endpoint:<host:port>`.

tasks/llm/slots.py defines what the OpenAI-compatible backend asks of a slot provider;
`PrefectEndpointLimits` is that provider, installed by flows/runners.py for every process that runs
the flow's tasks. A Prefect acquisition is a serialised API round trip plus a lease-renewal thread, so
slots are not taken per request: an `_EndpointSlots` pool per generate() call leases them in chunks
(`concurrency(name, occupy=k)`, k = waiting requests, at most `chunk`), hands a chunk's slots from a
finished request straight to the next one, and gives a chunk back as soon as its slots have sat idle
for `idle_release_s` (or at the end of the call). A worker that finds the limit full retries with
smaller chunks, then waits the server's Retry-After (capped at `max_wait_s`). The figures behind the
chunking: docs/decisions.md ("LLM stage").
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import random
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx

from tasks.llm.base import LLMUnavailable
from tasks.llm.http import retry_after_seconds

log = logging.getLogger(__name__)


def endpoint_limit_name(base_url: str) -> str:
    """`llm-endpoint:<host:port>`: the Prefect global concurrency limit of one replica."""
    url = httpx.URL(base_url)
    port = url.port or {"http": 80, "https": 443}.get(url.scheme, 0)
    return f"llm-endpoint:{url.host}:{port}"


@dataclass
class PrefectEndpointLimits:
    """The slot provider (tasks.llm.slots.SlotProvider) backed by Prefect global concurrency limits.

    `chunk`: slots leased per Prefect acquisition; `idle_release_s`: idle time before a chunk is given
    back; `max_wait_s`: longest wait between acquisition tries when the limit is full; `lease_duration_s`:
    the lease's duration (renewed while held)."""

    chunk: int = 32
    idle_release_s: float = 0.1
    max_wait_s: float = 1.0
    lease_duration_s: float = 300.0

    async def prepare(self, base_urls: Sequence[str], limit: int) -> None:
        """Create each replica's limit, or set it to `limit`."""
        names = list(dict.fromkeys(endpoint_limit_name(b) for b in base_urls))
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectAlreadyExists

        try:
            async with get_client() as client:
                for name in names:
                    try:
                        await client.upsert_global_concurrency_limit_by_name(name, limit)
                    except ObjectAlreadyExists:  # another worker created it between read and create
                        await client.upsert_global_concurrency_limit_by_name(name, limit)
        except Exception as exc:  # noqa: BLE001 — the limit cannot be enforced: fail the run, not each clip
            raise LLMUnavailable(f"cannot create the Prefect global concurrency limit(s) {names} for "
                                 f"llm.endpoint_limit={limit}: {type(exc).__name__}: {exc}") from None

    def open(self, base_urls: Sequence[str], limit: int) -> _EndpointPools:
        pools: dict[str, _EndpointSlots] = {}
        for base in base_urls:
            name = endpoint_limit_name(base)
            pools.setdefault(name, _EndpointSlots(name, limit, chunk=self.chunk, idle_release_s=self.idle_release_s,
                                                  max_wait_s=self.max_wait_s,
                                                  lease_duration_s=self.lease_duration_s))
        return _EndpointPools(pools)


class _EndpointPools:
    """One generate() call's pools (tasks.llm.slots.SlotPool), one per limit name."""

    def __init__(self, pools: dict[str, _EndpointSlots]) -> None:
        self._pools = pools

    @property
    def leases(self) -> int:
        return sum(pool.acquisitions for pool in self._pools.values())

    def slot(self, base_url: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._pools[endpoint_limit_name(base_url)].slot()

    async def aclose(self) -> None:
        await asyncio.gather(*(pool.aclose() for pool in self._pools.values()), return_exceptions=True)


class _Expected423Filter(logging.Filter):
    """Prefect's slot service logs an ERROR for every refused acquisition made with max_retries=0,
    which is how the endpoint pool probes a full limit; drop exactly those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Service %r failed to process item %r" or not isinstance(record.args, tuple):
            return True
        item = record.args[1] if len(record.args) > 1 else None
        if not (isinstance(item, tuple) and len(item) > 3 and item[3] == 0):
            return True
        future = item[-1]
        if not (isinstance(future, concurrent.futures.Future) and future.done() and not future.cancelled()):
            return True
        exc = future.exception()
        return not (isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 423)


_FILTER_LOCK = threading.Lock()
_filter_installed = False


def _quiet_expected_423() -> None:
    global _filter_installed
    with _FILTER_LOCK:
        if not _filter_installed:
            logging.getLogger("prefect._internal.concurrency").addFilter(_Expected423Filter())
            _filter_installed = True


@dataclass(eq=False)
class _Chunk:
    """k slots of a Prefect global concurrency limit, held by one lease until `done` is set."""

    size: int
    in_use: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    idle_timer: asyncio.TimerHandle | None = None


class _EndpointSlots:
    """This generate() call's share of one endpoint's Prefect global concurrency limit.

    Requests take slots from leased chunks; a finished request hands its slot to the next waiting
    one without a Prefect call. A chunk is leased for the requests waiting at that moment (at
    most `chunk`, never more than `limit` in all) and released once all its slots have been idle
    for `idle_release_s`, or when the call ends. One acquisition runs at a time (Prefect serialises
    them per limit name anyway); on 423 Locked it halves the chunk, then waits the server's
    Retry-After (at most `max_wait_s`). Any other failure fails every waiting request with
    LLMUnavailable: requests never go out without their slot.
    """

    def __init__(self, name: str, limit: int, *, chunk: int = 32, idle_release_s: float = 0.1,
                 max_wait_s: float = 1.0, lease_duration_s: float = 300.0) -> None:
        self.name = name
        self.limit = limit
        self.chunk = max(1, chunk)
        self.idle_release_s = idle_release_s
        self.max_wait_s = max_wait_s
        self.lease_duration_s = lease_duration_s
        self.acquisitions = 0  # Prefect leases taken (for tests and benchmarks)
        self._chunks: list[_Chunk] = []  # leased, not yet released
        self._all: list[_Chunk] = []
        self._waiters: collections.deque[asyncio.Future[_Chunk]] = collections.deque()
        self._acquirer: asyncio.Task[None] | None = None
        self._error: LLMUnavailable | None = None
        self._rng = random.Random()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        chunk = await self._take()
        try:
            yield
        finally:
            self._give(chunk)

    async def _take(self) -> _Chunk:
        if self._error is not None:
            raise self._error
        for c in self._chunks:
            if c.in_use < c.size:
                self._use(c)
                return c
        fut: asyncio.Future[_Chunk] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._acquirer is None or self._acquirer.done():
            self._acquirer = asyncio.ensure_future(self._acquire_loop())
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._give(fut.result())  # granted as we were cancelled: pass it on
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            raise

    def _use(self, c: _Chunk) -> None:
        c.in_use += 1
        if c.idle_timer is not None:
            c.idle_timer.cancel()
            c.idle_timer = None

    def _give(self, c: _Chunk) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(c)  # the slot passes on; in_use is unchanged
                return
        c.in_use -= 1
        if c.in_use == 0 and c.idle_timer is None and not c.done.is_set():
            c.idle_timer = asyncio.get_running_loop().call_later(self.idle_release_s, self._release, c)

    def _release(self, c: _Chunk) -> None:
        c.idle_timer = None
        if c.in_use == 0 and c in self._chunks:
            self._chunks.remove(c)
            c.done.set()  # the holder task leaves `concurrency(...)`, which gives the lease back

    def _live_waiters(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def _acquire_loop(self) -> None:
        try:
            while self._live_waiters():
                want = min(self.chunk, self._live_waiters(), self.limit - sum(c.size for c in self._chunks))
                if want <= 0:
                    return  # we hold the whole limit: waiters get slots as requests finish
                size, wait = want, 0.0
                while True:
                    chunk, retry_after = await self._try_lease(size)
                    if chunk is not None or size == 1:
                        break
                    size = max(1, size // 2)
                if chunk is None:
                    wait = min(self.max_wait_s, max(0.05, retry_after or 0.0)) * self._rng.uniform(0.5, 1.0)
                    await asyncio.sleep(wait)
                    continue
                self._chunks.append(chunk)
                while chunk.in_use < chunk.size and self._waiters:
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        self._use(chunk)
                        waiter.set_result(chunk)
                if chunk.in_use == 0:
                    self._release(chunk)
        except LLMUnavailable as exc:
            self._error = exc
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)

    async def _try_lease(self, size: int) -> tuple[_Chunk | None, float | None]:
        """Lease `size` slots in one go → (chunk, None), or (None, Retry-After) when the limit is full."""
        from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, concurrency

        _quiet_expected_423()
        chunk = _Chunk(size)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def hold() -> None:
            try:
                async with concurrency(self.name, occupy=size, max_retries=0, strict=True,
                                       lease_duration=self.lease_duration_s,
                                       raise_on_lease_renewal_failure=False):
                    if ready.done():  # the caller went away while we waited
                        return
                    ready.set_result(None)
                    await chunk.done.wait()
            except Exception as exc:  # noqa: BLE001 — handed to the waiting caller
                if not ready.done():
                    ready.set_exception(exc)
                else:
                    log.warning("releasing %d slot(s) of %s failed: %s", size, self.name, exc)

        chunk.task = asyncio.ensure_future(hold())
        self._all.append(chunk)
        try:
            await asyncio.shield(ready)
        except ConcurrencySlotAcquisitionError as exc:
            cause = exc.__cause__
            if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423:
                return None, retry_after_seconds(cause.response.headers.get("retry-after"))
            raise LLMUnavailable(f"cannot hold a slot of the Prefect global concurrency limit {self.name!r}: "
                                 f"{exc}") from None
        except asyncio.CancelledError:
            chunk.done.set()
            raise
        except Exception as exc:  # noqa: BLE001 — e.g. the Prefect API is unreachable
            raise LLMUnavailable(f"cannot hold a slot of the Prefect global concurrency limit {self.name!r}: "
                                 f"{type(exc).__name__}: {exc}") from None
        self.acquisitions += 1
        return chunk, None

    async def aclose(self) -> None:
        """Give every lease back (the end of a generate() call)."""
        if self._acquirer is not None and not self._acquirer.done():
            self._acquirer.cancel()
        for c in self._all:
            if c.idle_timer is not None:
                c.idle_timer.cancel()
            c.done.set()
        self._chunks.clear()
        tasks = [c.task for c in self._all if c.task is not None]
        if self._acquirer is not None:
            tasks.append(self._acquirer)
        await asyncio.gather(*tasks, return_exceptions=True)
