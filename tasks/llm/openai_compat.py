"""OpenAI-compatible chat backend: how the pipeline reaches `vllm serve` (or any such endpoint).

One `generate()` call sends a batch of requests with at most `config.concurrency` in flight,
each with its own deadline (`config.timeout_s`) and retries (`config.max_retries`, exponential
backoff with jitter from `config.backoff_s`, or the server's Retry-After). Retried: 408, 409, 429,
5xx, timeouts, connection errors, malformed or unsuitable JSON, empty content. Not retried: other
4xx. A request that finally fails becomes a QuarantineError (`llm_unavailable` after retries, a
transient reason the next run retries; `llm_error` for a refused request); the batch always comes
back whole.

The API key is read from the environment variable named by `config.api_key_env` and is never
logged nor put into an error message (it is also redacted from echoed server bodies).

Replicas (`config.endpoints`: base_url + base_urls, e.g. one `vllm serve` per GPU): every attempt
goes to the replica with the fewest requests in flight from this backend, round robin among ties.
A replica that fails with a connection error is benched for a cool-off (1 s, doubling per
consecutive failure, at most 30 s) and the retry goes to another replica at once (same attempt
count; the backoff is only waited when no other healthy replica is left). Preflight checks every
replica and names the one that is unreachable.

Endpoint limit (`config.endpoint_limit`): each request in flight holds one slot of the Prefect
global concurrency limit `llm-endpoint:<host:port>` (created or updated to the configured value on
first use), shared by every worker. A Prefect acquisition is a serialised API round trip plus a
lease-renewal thread (measured on the test server: 70-280 ms per request with occupy=1, i.e. 4.5 s
for 64 requests even without contention), so slots are not taken per request: an `_EndpointSlots`
pool per generate() call leases them in chunks (`concurrency(name, occupy=k)`, k = waiting requests,
at most `limit_chunk`), hands a chunk's slots from a finished request straight to the next one,
and gives a chunk back as soon as its slots have sat idle for `idle_release_s` (or at the end of
the call). A worker that finds the limit full retries with smaller chunks, then waits the
server's Retry-After (capped at `max_slot_wait_s`). Measured with chunks (fake server, 0.25 s per
answer): 512 requests at 64 in flight took 3.17 s with the limit and 2.94 s without; 128 requests at
32 in flight take 1 Prefect lease (of 32 slots) instead of 128.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import random
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Self

import aiohttp
import httpx

from schemas.config import LLMConfig
from schemas.records import Generation, QuarantineError, ReasonCode, Stage
from tasks.llm.base import LLMRequest, LLMResult, LLMUnavailable, OnResult
from tasks.stopping import RunInterrupted, until_stopped

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429})
BODY_EXCERPT_CHARS = 200


class _Retryable(Exception):
    """An attempt failed in a way worth trying again."""

    def __init__(self, message: str, *, empty: bool = False, retry_after: float | None = None,
                 connection: bool = False) -> None:
        super().__init__(message)
        self.empty = empty
        self.retry_after = retry_after
        self.connection = connection  # the replica could not be reached: retry on another one


class _Fatal(Exception):
    """An attempt failed in a way that retrying cannot fix (e.g. HTTP 400)."""


def _excerpt(text: str, limit: int = BODY_EXCERPT_CHARS) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[:limit] + "…"


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or HTTP-date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAICompatBackend:
    """POST each request to one replica of `config.endpoints` (path: `_route()`)."""

    name = "openai"
    # generate() takes on_result=callback(index, result), called as each request finishes.
    supports_on_result = True
    # Longest wait a server's Retry-After can impose before one retry; backoff never waits longer either.
    max_retry_after_s: float = 60.0
    max_backoff_s: float = 60.0
    # A replica with a connection error is skipped for cooldown * 2**(failures-1) seconds (capped).
    replica_cooldown_s: float = 1.0
    max_replica_cooldown_s: float = 30.0
    # Endpoint limit: slots leased per Prefect acquisition, idle time before a chunk is given back,
    # longest wait between acquisition tries when the limit is full, lease duration (renewed).
    limit_chunk: int = 32
    idle_release_s: float = 0.1
    max_slot_wait_s: float = 1.0
    lease_duration_s: float = 300.0

    def __init__(self, config: LLMConfig) -> None:
        if not (config.endpoints and config.model):
            raise ValueError("llm.backend 'openai' needs llm.base_url (or llm.base_urls) and llm.model")
        self.config = config
        self.base_urls = [u.rstrip("/") for u in config.endpoints]
        self.url = self.base_urls[0] + self._route()
        self._rng = random.Random()
        self._replicas = [_Replica(u) for u in self.base_urls]
        self._rr = 0
        self._pick_lock = threading.Lock()
        self._limits_ready: set[str] = set()
        self.slot_leases = 0  # Prefect leases taken for llm.endpoint_limit (chunks, not requests)

    # -- public API -------------------------------------------------------------------------------

    def model_info(self) -> dict[str, str | None]:
        return {"name": self.config.model, "revision": None}

    def generate(self, requests: Sequence[LLMRequest],
                 on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        """Synchronous: runs its own event loop (also from worker threads, or beside a running loop).

        `on_result(index, result)` (optional) is called on the loop's thread as each request
        finishes, so a caller (the request cache) can persist results before the batch ends.
        """
        requests = list(requests)
        if not requests:
            return []
        return _run_sync(lambda: self.agenerate(requests, on_result))

    async def agenerate(self, requests: Sequence[LLMRequest],
                        on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        cfg = self.config
        sem = asyncio.Semaphore(cfg.concurrency)
        slots: dict[str, _EndpointSlots] = {}
        if cfg.endpoint_limit is not None:
            await self._ensure_limits()
            for base in self.base_urls:
                name = endpoint_limit_name(base)
                slots.setdefault(name, _EndpointSlots(
                    name, cfg.endpoint_limit, chunk=self.limit_chunk, idle_release_s=self.idle_release_s,
                    max_wait_s=self.max_slot_wait_s, lease_duration_s=self.lease_duration_s))

        async with _Session(cfg.concurrency, cfg.timeout_s, self._headers()) as http:

            async def run(i: int, req: LLMRequest) -> LLMResult | QuarantineError:
                res = await self._one(http, sem, req, slots)
                if on_result is not None:
                    on_result(i, res)
                return res

            tasks = [asyncio.ensure_future(run(i, r)) for i, r in enumerate(requests)]
            batch: asyncio.Future[Any] = asyncio.gather(*tasks)
            stopped: asyncio.Future[Any] = asyncio.ensure_future(until_stopped())
            try:
                # A stop request (SIGTERM/SIGINT) abandons the requests in flight at once; the
                # finished ones were already handed to `on_result` (the request cache keeps them).
                await asyncio.wait([batch, stopped], return_when=asyncio.FIRST_COMPLETED)
                if not batch.done():
                    raise RunInterrupted("LLM requests in flight abandoned")
                return list(batch.result())
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.gather(batch, return_exceptions=True)  # its outcome retrieved: no "never retrieved"
                raise
            finally:
                stopped.cancel()
                await asyncio.gather(*(pool.aclose() for pool in slots.values()), return_exceptions=True)
                self.slot_leases += sum(pool.acquisitions for pool in slots.values())

    def preflight(self) -> None:
        """Fail fast, before any clip, when a replica is unreachable, refuses the key or lacks the model.

        Without this, a typo in llm.base_url would quarantine every clip as llm_error after retries.
        Any HTTP answer other than 401/403 counts as reachable (servers without /models are fine).
        Every replica is checked; the error names the first one that fails. With llm.endpoint_limit
        set, the Prefect global concurrency limits are created (or updated) here as well.
        """
        self._check_completion_tokenizer()
        for base in self.base_urls:
            self._preflight_one(base)
        if self.config.endpoint_limit is not None:
            _run_sync(self._ensure_limits)

    def _preflight_one(self, base: str) -> None:
        what = "llm.base_url" if len(self.base_urls) == 1 else "llm replica"
        try:
            resp = httpx.get(base + "/models", headers=self._headers(), timeout=min(10.0, self.config.timeout_s))
        except httpx.HTTPError as exc:
            raise LLMUnavailable(f"{what} {base} is unreachable "
                                 f"({exc.__class__.__name__}); start the server (e.g. `vllm serve MODEL`) "
                                 "or fix llm.base_url / llm.base_urls") from None
        if resp.status_code in (401, 403):
            raise LLMUnavailable(f"{what} {base} refused the API key (HTTP "
                                 f"{resp.status_code}); set the environment variable {self.config.api_key_env}")
        if resp.status_code != 200:
            return
        try:
            served = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            return
        if served and self.config.model not in served:
            raise LLMUnavailable(f"llm.model {self.config.model!r} is not served at {base}; "
                                 f"served: {served}")

    async def _ensure_limits(self) -> None:
        """Create each endpoint's Prefect global concurrency limit, or set it to llm.endpoint_limit."""
        limit = self.config.endpoint_limit
        if limit is None:
            return
        names = [n for n in dict.fromkeys(endpoint_limit_name(b) for b in self.base_urls)
                 if n not in self._limits_ready]
        if not names:
            return
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectAlreadyExists

        try:
            async with get_client() as client:
                for name in names:
                    try:
                        await client.upsert_global_concurrency_limit_by_name(name, limit)
                    except ObjectAlreadyExists:  # another worker created it between read and create
                        await client.upsert_global_concurrency_limit_by_name(name, limit)
                    self._limits_ready.add(name)
        except Exception as exc:  # noqa: BLE001 — the limit cannot be enforced: fail the run, not each clip
            raise LLMUnavailable(f"cannot create the Prefect global concurrency limit(s) {names} for "
                                 f"llm.endpoint_limit={limit}: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        """Nothing to release: each generate() call owns its client."""

    # -- internals --------------------------------------------------------------------------------

    def _api_key(self) -> str | None:
        key = os.environ.get(self.config.api_key_env)
        return (key.strip() or None) if key else None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _redact(self, text: str) -> str:
        key = self._api_key()
        return text.replace(key, "***") if key else text

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.config.backoff_s * (2 ** (attempt - 1)))
        return base * self._rng.uniform(0.5, 1.0)  # "equal jitter": never less than half the step

    def _payload(self, req: LLMRequest) -> dict[str, Any]:
        if self.config.prompt_format == "completion":
            return self._completion_payload(req)
        cfg = self.config
        return {
            "model": cfg.model,
            "messages": [m.model_dump(mode="json") for m in req.messages],
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
            "seed": req.seed,
        }

    # -- completion mode (prompt_format: completion) ----------------------------------------------

    def _route(self) -> str:
        """Path under a base URL: /completions with a locally rendered prompt, else /chat/completions."""
        return "/completions" if self.config.prompt_format == "completion" else "/chat/completions"

    def _check_completion_tokenizer(self) -> None:
        """Completion mode: the llm.tokenizer directory loads and has a chat template (no network)."""
        if self.config.prompt_format == "completion":
            from tasks.llm.chat_template import check_tokenizer

            check_tokenizer(self.config.tokenizer)

    def _completion_payload(self, req: LLMRequest) -> dict[str, Any]:
        """POST /completions body: `prompt` is the messages rendered with the backbone's own chat template.

        The rendered text already holds the template's special tokens; when it starts with the
        tokenizer's BOS, `add_special_tokens: false` (a vLLM extension) keeps the server from adding a second.
        """
        from tasks.llm.chat_template import load_tokenizer, render_prompt

        cfg = self.config
        prompt = render_prompt(req.messages, cfg.tokenizer)
        payload: dict[str, Any] = {
            "model": cfg.model,
            "prompt": prompt,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
            "seed": req.seed,
        }
        bos = getattr(load_tokenizer(cfg.tokenizer), "bos_token", None)
        if bos and prompt.startswith(bos):
            payload["add_special_tokens"] = False
        return payload

    # -- replicas ---------------------------------------------------------------------------------

    def _pick(self, avoid: set[int]) -> int:
        """Index of the replica for the next attempt: fewest in flight, round robin among ties;
        replicas in `avoid` (failed this request) or cooling off are skipped while others remain."""
        with self._pick_lock:
            n = len(self._replicas)
            now = time.monotonic()
            allowed = [i for i in range(n) if i not in avoid] or list(range(n))
            healthy = [i for i in allowed if self._replicas[i].down_until <= now] or allowed
            low = min(self._replicas[i].in_flight for i in healthy)
            pick = next(i for i in ((self._rr + k) % n for k in range(n))
                        if i in healthy and self._replicas[i].in_flight == low)
            self._rr = (pick + 1) % n
            self._replicas[pick].in_flight += 1
            return pick

    def _done(self, index: int, *, connection_failed: bool = False, ok: bool = False) -> None:
        with self._pick_lock:
            rep = self._replicas[index]
            rep.in_flight -= 1
            if connection_failed:
                rep.failures += 1
                cool = min(self.max_replica_cooldown_s, self.replica_cooldown_s * 2 ** (rep.failures - 1))
                rep.down_until = time.monotonic() + cool
            elif ok:
                rep.failures = 0
                rep.down_until = 0.0

    def _other_healthy(self, avoid: set[int]) -> bool:
        now = time.monotonic()
        with self._pick_lock:
            return any(i not in avoid and r.down_until <= now for i, r in enumerate(self._replicas))

    async def _one(self, http: _Session, sem: asyncio.Semaphore, req: LLMRequest,
                   slots: dict[str, _EndpointSlots] | None = None) -> LLMResult | QuarantineError:
        attempts_allowed = self.config.max_retries + 1
        last: _Retryable | None = None
        avoid: set[int] = set()  # replicas that refused this request's connection
        for attempt in range(1, attempts_allowed + 1):
            try:
                async with sem:
                    index = self._pick(avoid)
                    base = self._replicas[index].base_url
                    failed_connection = False
                    try:
                        pool = slots.get(endpoint_limit_name(base)) if slots else None
                        async with pool.slot() if pool is not None else contextlib.nullcontext():
                            started = time.perf_counter()
                            text, gen_fields = await self._attempt(http, req, base)
                            latency = time.perf_counter() - started
                    except _Retryable as exc:
                        failed_connection = exc.connection
                        raise
                    finally:
                        self._done(index, connection_failed=failed_connection, ok=not failed_connection)
            except _Fatal as exc:
                return QuarantineError(Stage.llm, ReasonCode.llm_error,
                                       self._redact(f"{req.id}: not retried (attempt {attempt}): {exc}"))
            except LLMUnavailable:
                raise  # the endpoint limit cannot be held: the batch fails, nothing is quarantined
            except _Retryable as exc:
                last = exc
                if exc.connection and len(self._replicas) > 1:
                    avoid.add(index)
                    if len(avoid) == len(self._replicas):
                        avoid = {index}  # every replica failed once: keep cycling, with backoff
                if attempt < attempts_allowed:
                    if exc.retry_after is not None:
                        delay = min(exc.retry_after, self.max_retry_after_s)
                    elif exc.connection and len(self._replicas) > 1 and self._other_healthy(avoid):
                        delay = 0.0  # fail over to a healthy replica at once
                    else:
                        delay = self._backoff(attempt)
                    log.debug("llm %s: attempt %d failed (%s); retrying in %.2fs",
                              req.id, attempt, self._redact(str(exc)), delay)
                    await asyncio.sleep(delay)
                continue
            except Exception as exc:  # noqa: BLE001 — a bug or an unforeseen error: quarantine this clip, keep the batch
                return QuarantineError(Stage.llm, ReasonCode.llm_error, self._redact(
                    f"{req.id}: unexpected error (attempt {attempt}): {type(exc).__name__}: {exc}"))
            gen = Generation(backend=self.name, temperature=self.config.temperature, top_p=self.config.top_p,
                             max_tokens=self.config.max_tokens, seed=req.seed, attempts=attempt,
                             latency_s=round(latency, 6), **gen_fields)
            return LLMResult(id=req.id, text=text, generation=gen)

        assert last is not None
        if last.empty:
            return QuarantineError(Stage.llm, ReasonCode.llm_empty, self._redact(
                f"{req.id}: empty response after {attempts_allowed} attempts: {last}"))
        # Retryable to the end (unreachable, 5xx, 429, timeouts): the service failed, not the clip, so
        # the next run of the same config retries it (TRANSIENT_REASONS).
        return QuarantineError(Stage.llm, ReasonCode.llm_unavailable, self._redact(
            f"{req.id}: request failed after {attempts_allowed} attempts: {last}"))

    async def _attempt(self, http: _Session, req: LLMRequest,
                       base_url: str | None = None) -> tuple[str, dict[str, Any]]:
        """One HTTP call to one replica → (text, Generation fields); raises _Retryable or _Fatal."""
        timeout = self.config.timeout_s
        url = self.url if base_url is None else base_url + self._route()
        try:
            async with asyncio.timeout(timeout):  # whole-request deadline: connect, send, wait, read
                status, retry_after, raw = await http.post(url, _json_bytes(self._payload(req)))
        except TimeoutError:  # also aiohttp's connect/read timeouts
            raise _Retryable(f"timed out after {timeout:g}s") from None
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise _Fatal(f"bad endpoint URL: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, dropped, truncated, bad HTTP
            raise _Retryable(f"connection error: {type(exc).__name__}: {exc}", connection=True) from None

        if status in RETRY_STATUSES or status >= 500:
            raise _Retryable(f"HTTP {status}: {_excerpt(_text(raw))}", retry_after=_retry_after_seconds(retry_after))
        if not 200 <= status < 300:
            raise _Fatal(f"HTTP {status}: {_excerpt(_text(raw))}")

        try:
            data = json.loads(raw)
        except ValueError:
            raise _Retryable(f"malformed JSON in response: {_excerpt(_text(raw), 80)}") from None
        try:
            choice = data["choices"][0]
            if self.config.prompt_format == "completion":
                content = choice["text"]  # /completions: choices[0].text
            else:
                message = choice["message"]
                content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable(f"unsuitable response JSON (no choices[0].message): {_excerpt(_text(raw), 80)}") from None
        finish_reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if content is not None and not isinstance(content, str):
            raise _Retryable(f"unsuitable response JSON: content is {type(content).__name__}, not a string")
        text = (content or "").strip()
        if not text:
            raise _Retryable(f"empty content (finish_reason={finish_reason})", empty=True)

        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        model = data.get("model") if isinstance(data.get("model"), str) and data.get("model") else None
        return text, {
            "model": model or self.config.model,
            "revision": None,
            "finish_reason": finish_reason if isinstance(finish_reason, str) else None,
            "prompt_tokens": _int_or_none(usage.get("prompt_tokens")),
            "completion_tokens": _int_or_none(usage.get("completion_tokens")),
        }


def _json_bytes(payload: dict[str, Any]) -> bytes:
    """A request body as compact UTF-8 JSON (no NaN: a server would reject it anyway)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _run_sync(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine to completion from sync code, also when a loop already runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    # Called from inside a running loop (e.g. async code): run ours on a separate thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


# Below the 5 s keep-alive of uvicorn (what `vllm serve` runs on): an idle connection is dropped here
# before the server closes it, so a request never goes out on a socket the server is closing.
KEEPALIVE_S = 4.0


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One verifying TLS context for every session: loading the CA bundle costs ~17 ms each time."""
    return httpx.create_ssl_context()


class _Session:
    """This generate() call's HTTP client: one aiohttp session, at most `concurrency` connections
    (shared by all replicas), kept alive across requests.

    aiohttp rather than httpx on this hot path: against the fake server (bench/llm.py) at 64 in
    flight, httpx/httpcore spent ~3 ms of client CPU per request (connection pool scans, anyio) and
    aiohttp ~0.65 ms, so one client core keeps several GPU servers busy instead of saturating first.
    Proxy variables (HTTP(S)_PROXY, NO_PROXY) are honoured as httpx did, looked up once per
    replica: aiohttp's own `trust_env` does it, and reads ~/.netrc, on a worker thread per request.
    No cookies are kept.
    """

    def __init__(self, concurrency: int, timeout_s: float, headers: dict[str, str]) -> None:
        self._args = (concurrency, timeout_s, headers)
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, str | None] = {}  # by URL: one per replica and route

    async def __aenter__(self) -> Self:
        concurrency, timeout_s, headers = self._args
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ssl=_ssl_context(),
                                         keepalive_timeout=KEEPALIVE_S)
        # The whole-request deadline is the caller's (asyncio.timeout); connecting alone may not take longer.
        self._session = aiohttp.ClientSession(connector=connector, headers=headers,
                                              cookie_jar=aiohttp.DummyCookieJar(),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, url: str, body: bytes) -> tuple[int, str | None, bytes]:
        """POST `body` (JSON) → (status, Retry-After header, response body)."""
        assert self._session is not None, "use `async with _Session(...)`"
        if url not in self._proxies:
            self._proxies[url] = env_proxy(url)
        async with self._session.post(url, data=body, proxy=self._proxies[url]) as resp:
            return resp.status, resp.headers.get("Retry-After"), await resp.read()


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTP_PROXY / HTTPS_PROXY / ALL_PROXY), None when
    there is none or NO_PROXY exempts the host."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


def endpoint_limit_name(base_url: str) -> str:
    """`llm-endpoint:<host:port>`: the Prefect global concurrency limit of one replica."""
    url = httpx.URL(base_url)
    port = url.port or {"http": 80, "https": 443}.get(url.scheme, 0)
    return f"llm-endpoint:{url.host}:{port}"


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


@dataclass
class _Replica:
    base_url: str
    in_flight: int = 0
    failures: int = 0  # consecutive connection failures
    down_until: float = 0.0  # monotonic time until which the replica is skipped


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
                return None, _retry_after_seconds(cause.response.headers.get("retry-after"))
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
