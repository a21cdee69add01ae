"""HTTP for the OpenAI-compatible backend: the session, one attempt's outcome, retry timing, proxies.

An attempt either returns the response body of a 2xx answer or raises `Retryable` (408, 409, 429,
5xx, timeouts, connection errors: worth another try, maybe on another replica) or `Fatal` (any other
4xx, a bad URL: retrying cannot fix it). How often and where to retry is the backend's policy
(openai_compat.py); how long to wait is `backoff_delay`, or the server's `Retry-After`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import random
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine
from email.utils import parsedate_to_datetime
from typing import Any, Self

import aiohttp
import httpx

RETRY_STATUSES = frozenset({408, 409, 429})
BODY_EXCERPT_CHARS = 200
# Below the 5 s keep-alive of uvicorn (what `vllm serve` runs on): an idle connection is dropped here
# before the server closes it, so a request never goes out on a socket the server is closing.
KEEPALIVE_S = 4.0


class Retryable(Exception):
    """An attempt failed in a way worth trying again."""

    def __init__(self, message: str, *, empty: bool = False, retry_after: float | None = None,
                 connection: bool = False) -> None:
        super().__init__(message)
        self.empty = empty
        self.retry_after = retry_after
        self.connection = connection  # the replica could not be reached: retry on another one


class Fatal(Exception):
    """An attempt failed in a way that retrying cannot fix (e.g. HTTP 400)."""


def excerpt(text: str, limit: int = BODY_EXCERPT_CHARS) -> str:
    """One line of at most `limit` characters (a server's error body in a message)."""
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[:limit] + "…"


def body_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def json_bytes(payload: dict[str, Any]) -> bytes:
    """A request body as compact UTF-8 JSON (no NaN: a server would reject it anyway)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def retry_after_seconds(value: str | None) -> float | None:
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


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": base·2^(attempt-1), capped, never less than half the step."""
    step = min(cap_s, base_s * (2 ** (attempt - 1)))
    return step * rng.uniform(0.5, 1.0)


def run_sync(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine to completion from sync code, also when a loop already runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    # Called from inside a running loop (e.g. async code): run ours on a separate thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One verifying TLS context for every session (loading the CA bundle is slow: docs/decisions.md)."""
    return httpx.create_ssl_context()


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTP_PROXY / HTTPS_PROXY / ALL_PROXY), None when
    there is none or NO_PROXY exempts the host."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


class Session:
    """One generate() call's HTTP client: one aiohttp session, at most `concurrency` connections
    (shared by all replicas), kept alive across requests, no cookies. Proxy variables (HTTP(S)_PROXY,
    NO_PROXY) are honoured, looked up once per URL (aiohttp's own `trust_env` would do it, and read
    ~/.netrc, on a worker thread per request). Why aiohttp and not httpx: docs/decisions.md."""

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
        assert self._session is not None, "use `async with Session(...)`"
        if url not in self._proxies:
            self._proxies[url] = env_proxy(url)
        async with self._session.post(url, data=body, proxy=self._proxies[url]) as resp:
            return resp.status, resp.headers.get("Retry-After"), await resp.read()

    async def attempt(self, url: str, body: Callable[[], bytes], timeout_s: float) -> bytes:
        """One attempt: POST `body()` (built inside the deadline) → the body of a 2xx answer; raises
        Retryable or Fatal otherwise. The deadline covers connect, send, wait and read."""
        try:
            async with asyncio.timeout(timeout_s):
                status, retry_after, raw = await self.post(url, body())
        except TimeoutError:  # also aiohttp's connect/read timeouts
            raise Retryable(f"timed out after {timeout_s:g}s") from None
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise Fatal(f"bad endpoint URL: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, dropped, truncated, bad HTTP
            raise Retryable(f"connection error: {type(exc).__name__}: {exc}", connection=True) from None
        if status in RETRY_STATUSES or status >= 500:
            raise Retryable(f"HTTP {status}: {excerpt(body_text(raw))}", retry_after=retry_after_seconds(retry_after))
        if not 200 <= status < 300:
            raise Fatal(f"HTTP {status}: {excerpt(body_text(raw))}")
        return raw
