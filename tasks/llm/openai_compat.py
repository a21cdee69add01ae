"""OpenAI-compatible chat backend: how the pipeline reaches `vllm serve` (or any such endpoint).

One `generate()` call sends a batch of requests with at most `config.concurrency` in flight,
each with its own deadline (`config.timeout_s`) and retries (`config.max_retries`, exponential
backoff with jitter from `config.backoff_s`, or the server's Retry-After). Retried: 408, 409, 429,
5xx, timeouts, connection errors, malformed or unsuitable JSON, empty content. Not retried: other
4xx. A request that finally fails becomes a QuarantineError; the batch always comes back whole.

The API key is read from the environment variable named by `config.api_key_env` and is never
logged nor put into an error message (it is also redacted from echoed server bodies).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from schemas.config import LLMConfig
from schemas.records import Generation, QuarantineError, ReasonCode, Stage
from tasks.llm.base import LLMRequest, LLMResult

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429})
BODY_EXCERPT_CHARS = 200


class LLMUnavailable(RuntimeError):
    """The endpoint cannot serve this run at all: fail the run up front, quarantine nothing."""


class _Retryable(Exception):
    """An attempt failed in a way worth trying again."""

    def __init__(self, message: str, *, empty: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.empty = empty
        self.retry_after = retry_after


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
    """POST {base_url}/chat/completions for each request."""

    name = "openai"
    # Longest wait a server's Retry-After can impose before one retry; backoff never waits longer either.
    max_retry_after_s: float = 60.0
    max_backoff_s: float = 60.0

    def __init__(self, config: LLMConfig) -> None:
        if not (config.base_url and config.model):
            raise ValueError("llm.backend 'openai' needs llm.base_url and llm.model")
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._rng = random.Random()

    # -- public API -------------------------------------------------------------------------------

    def model_info(self) -> dict[str, str | None]:
        return {"name": self.config.model, "revision": None}

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMResult | QuarantineError]:
        """Synchronous: runs its own event loop (also from worker threads, or beside a running loop)."""
        requests = list(requests)
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(requests))
        # Called from inside a running loop (e.g. async code): run ours on a separate thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.agenerate(requests)).result()

    async def agenerate(self, requests: Sequence[LLMRequest]) -> list[LLMResult | QuarantineError]:
        cfg = self.config
        sem = asyncio.Semaphore(cfg.concurrency)
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits,
                                     headers=self._headers()) as client:
            return list(await asyncio.gather(*(self._one(client, sem, r) for r in requests)))

    def preflight(self) -> None:
        """Fail fast, before any clip, when the endpoint is unreachable, refuses the key or lacks the model.

        Without this, a typo in llm.base_url would quarantine every clip as llm_error after retries.
        Any HTTP answer other than 401/403 counts as reachable (servers without /models are fine).
        """
        url = self.config.base_url.rstrip("/") + "/models"  # type: ignore[union-attr]
        try:
            resp = httpx.get(url, headers=self._headers(), timeout=min(10.0, self.config.timeout_s))
        except httpx.HTTPError as exc:
            raise LLMUnavailable(f"llm.base_url {self.config.base_url} is unreachable "
                                 f"({exc.__class__.__name__}); start the server (e.g. `vllm serve MODEL`) "
                                 "or fix llm.base_url") from None
        if resp.status_code in (401, 403):
            raise LLMUnavailable(f"llm.base_url {self.config.base_url} refused the API key (HTTP "
                                 f"{resp.status_code}); set the environment variable {self.config.api_key_env}")
        if resp.status_code != 200:
            return
        try:
            served = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            return
        if served and self.config.model not in served:
            raise LLMUnavailable(f"llm.model {self.config.model!r} is not served at {self.config.base_url}; "
                                 f"served: {served}")

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
        cfg = self.config
        return {
            "model": cfg.model,
            "messages": [m.model_dump(mode="json") for m in req.messages],
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
            "seed": req.seed,
        }

    async def _one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore,
                   req: LLMRequest) -> LLMResult | QuarantineError:
        attempts_allowed = self.config.max_retries + 1
        last: _Retryable | None = None
        for attempt in range(1, attempts_allowed + 1):
            try:
                async with sem:
                    started = time.perf_counter()
                    text, gen_fields = await self._attempt(client, req)
                    latency = time.perf_counter() - started
            except _Fatal as exc:
                return QuarantineError(Stage.llm, ReasonCode.llm_error,
                                       self._redact(f"{req.id}: not retried (attempt {attempt}): {exc}"))
            except _Retryable as exc:
                last = exc
                if attempt < attempts_allowed:
                    if exc.retry_after is not None:
                        delay = min(exc.retry_after, self.max_retry_after_s)
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
        return QuarantineError(Stage.llm, ReasonCode.llm_error, self._redact(
            f"{req.id}: request failed after {attempts_allowed} attempts: {last}"))

    async def _attempt(self, client: httpx.AsyncClient, req: LLMRequest) -> tuple[str, dict[str, Any]]:
        """One HTTP call → (text, Generation fields); raises _Retryable or _Fatal."""
        timeout = self.config.timeout_s
        try:
            async with asyncio.timeout(timeout):  # whole-request deadline (httpx's is per read/write)
                resp = await client.post(self.url, json=self._payload(req))
        except (TimeoutError, httpx.TimeoutException):
            raise _Retryable(f"timed out after {timeout:g}s") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise _Fatal(f"bad endpoint URL: {exc}") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection error: {type(exc).__name__}: {exc}") from None

        status = resp.status_code
        if status in RETRY_STATUSES or status >= 500:
            raise _Retryable(f"HTTP {status}: {_excerpt(resp.text)}",
                             retry_after=_retry_after_seconds(resp.headers.get("retry-after")))
        if not 200 <= status < 300:
            raise _Fatal(f"HTTP {status}: {_excerpt(resp.text)}")

        try:
            data = resp.json()
        except ValueError:
            raise _Retryable(f"malformed JSON in response: {_excerpt(resp.text, 80)}") from None
        try:
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable(f"unsuitable response JSON (no choices[0].message): {_excerpt(resp.text, 80)}") from None
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


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
