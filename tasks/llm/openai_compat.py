"""OpenAI-compatible chat backend: how the pipeline reaches `vllm serve` (or any such endpoint).

One `generate()` call sends a batch of requests with at most `config.concurrency` in flight,
each with its own deadline (`config.timeout_s`) and retries (`config.max_retries`, exponential
backoff with jitter from `config.backoff_s`, or the server's Retry-After). Retried: 408, 409, 429,
5xx, timeouts, connection errors, malformed or unsuitable JSON, empty content. Not retried: other
4xx. A request that finally fails becomes a QuarantineError (`llm_unavailable` after retries, a
transient reason the next run retries; `llm_error` for a refused request); the batch always comes
back whole. The HTTP side (session, one attempt, Retry-After, proxies) is tasks/llm/http.py.

The API key is read from the environment variable named by `config.api_key_env` and is never
logged nor put into an error message (it is also redacted from echoed server bodies).

Replicas (`config.endpoints`, tasks/llm/replicas.py): each attempt goes to the least busy replica;
one that fails with a connection error sits out a cool-off and the retry goes to another replica at
once (same attempt count; the backoff is only waited when no other healthy replica is left).
Preflight checks every replica and names the one that is unreachable.

Endpoint limit (`config.endpoint_limit`): each request in flight holds a slot of its replica's
limit, shared by every worker, from a `SlotProvider` (tasks/llm/slots.py: the one given, else the
one the flow installed, which holds a Prefect global concurrency limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx

from schemas.config import LLMConfig
from schemas.records import Generation, QuarantineError, ReasonCode, Stage
from tasks.llm.base import LLMBackend, LLMRequest, LLMResult, LLMUnavailable, OnResult
from tasks.llm.http import Fatal, Retryable, Session, backoff_delay, body_text, excerpt, json_bytes, run_sync
from tasks.llm.replicas import ReplicaSet
from tasks.llm.slots import SlotPool, SlotProvider, installed_slot_provider
from tasks.stopping import RunInterrupted, until_stopped

log = logging.getLogger(__name__)


class OpenAICompatBackend(LLMBackend):
    """POST each request to one replica of `config.endpoints` (path: `_route()`)."""

    name = "openai"
    config: LLMConfig
    # Longest wait a server's Retry-After can impose before one retry; backoff never waits longer either.
    max_retry_after_s: float = 60.0
    max_backoff_s: float = 60.0

    def __init__(self, config: LLMConfig, slots: SlotProvider | None = None) -> None:
        if not (config.endpoints and config.model):
            raise ValueError("llm.backend 'openai' needs llm.base_url (or llm.base_urls) and llm.model")
        self.config = config
        self.base_urls = [u.rstrip("/") for u in config.endpoints]
        self.url = self.base_urls[0] + self._route()
        self.replicas = ReplicaSet(self.base_urls)
        self._rng = random.Random()
        self._slots = slots
        self._limits_ready = False
        self.slot_leases = 0  # slot acquisitions for llm.endpoint_limit (chunks of slots, not requests)

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
        return run_sync(lambda: self.agenerate(requests, on_result))

    async def agenerate(self, requests: Sequence[LLMRequest],
                        on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        cfg = self.config
        sem = asyncio.Semaphore(cfg.concurrency)
        pool: SlotPool | None = None
        if cfg.endpoint_limit is not None:
            await self._ensure_limits()
            pool = self._required_slot_provider().open(self.base_urls, cfg.endpoint_limit)

        async with Session(cfg.concurrency, cfg.timeout_s, self._headers()) as http:

            async def run(i: int, req: LLMRequest) -> LLMResult | QuarantineError:
                res = await self._one(http, sem, req, pool)
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
                if pool is not None:
                    await asyncio.gather(pool.aclose(), return_exceptions=True)
                    self.slot_leases += pool.leases

    def preflight(self) -> None:
        """Fail fast, before any clip, when a replica is unreachable, refuses the key or lacks the model.

        Without this, a typo in llm.base_url would quarantine every clip as llm_error after retries.
        Any HTTP answer other than 401/403 counts as reachable (servers without /models are fine).
        Every replica is checked; the error names the first one that fails. With llm.endpoint_limit
        set, the endpoint limits are created (or updated) here as well, where a slot provider is
        installed (the flow's processes; the CLI's pre-flight runs before the flow installs one).
        """
        self._check_completion_tokenizer()
        for base in self.base_urls:
            self._preflight_one(base)
        if self.config.endpoint_limit is not None and self._slot_provider() is not None:
            run_sync(self._ensure_limits)

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

    # -- endpoint limit ---------------------------------------------------------------------------

    def _slot_provider(self) -> SlotProvider | None:
        return self._slots or installed_slot_provider()

    def _required_slot_provider(self) -> SlotProvider:
        provider = self._slot_provider()
        if provider is None:
            raise LLMUnavailable(f"llm.endpoint_limit={self.config.endpoint_limit} needs a slot provider: runs "
                                 "started by speechpairs install the Prefect one (flows/runners.py); elsewhere "
                                 "pass OpenAICompatBackend(config, slots=...) or unset llm.endpoint_limit")
        return provider

    async def _ensure_limits(self) -> None:
        """Create each replica's endpoint limit, or set it to llm.endpoint_limit (once per backend)."""
        limit = self.config.endpoint_limit
        if limit is None or self._limits_ready:
            return
        await self._required_slot_provider().prepare(self.base_urls, limit)
        self._limits_ready = True

    # -- requests ---------------------------------------------------------------------------------

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
        return backoff_delay(attempt, self.config.backoff_s, self.max_backoff_s, self._rng)

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

    async def _one(self, http: Session, sem: asyncio.Semaphore, req: LLMRequest,
                   slots: SlotPool | None = None) -> LLMResult | QuarantineError:
        attempts_allowed = self.config.max_retries + 1
        replicas = self.replicas
        last: Retryable | None = None
        avoid: set[int] = set()  # replicas that refused this request's connection
        for attempt in range(1, attempts_allowed + 1):
            try:
                async with sem:
                    index = replicas.pick(avoid)
                    base = replicas.base_url(index)
                    failed_connection = False
                    try:
                        async with slots.slot(base) if slots is not None else contextlib.nullcontext():
                            started = time.perf_counter()
                            text, gen_fields = await self._attempt(http, req, base)
                            latency = time.perf_counter() - started
                    except Retryable as exc:
                        failed_connection = exc.connection
                        raise
                    finally:
                        replicas.done(index, connection_failed=failed_connection, ok=not failed_connection)
            except Fatal as exc:
                return QuarantineError(Stage.llm, ReasonCode.llm_error,
                                       self._redact(f"{req.id}: not retried (attempt {attempt}): {exc}"))
            except LLMUnavailable:
                raise  # the endpoint limit cannot be held: the batch fails, nothing is quarantined
            except Retryable as exc:
                last = exc
                if exc.connection and len(replicas) > 1:
                    avoid.add(index)
                    if len(avoid) == len(replicas):
                        avoid = {index}  # every replica failed once: keep cycling, with backoff
                if attempt < attempts_allowed:
                    if exc.retry_after is not None:
                        delay = min(exc.retry_after, self.max_retry_after_s)
                    elif exc.connection and len(replicas) > 1 and replicas.other_healthy(avoid):
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

    async def _attempt(self, http: Session, req: LLMRequest,
                       base_url: str | None = None) -> tuple[str, dict[str, Any]]:
        """One HTTP call to one replica → (text, Generation fields); raises Retryable or Fatal."""
        url = self.url if base_url is None else base_url + self._route()
        raw = await http.attempt(url, lambda: json_bytes(self._payload(req)), self.config.timeout_s)
        try:
            data = json.loads(raw)
        except ValueError:
            raise Retryable(f"malformed JSON in response: {excerpt(body_text(raw), 80)}") from None
        try:
            choice = data["choices"][0]
            if self.config.prompt_format == "completion":
                content = choice["text"]  # /completions: choices[0].text
            else:
                message = choice["message"]
                content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise Retryable(f"unsuitable response JSON (no choices[0].message): {excerpt(body_text(raw), 80)}") \
                from None
        finish_reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if content is not None and not isinstance(content, str):
            raise Retryable(f"unsuitable response JSON: content is {type(content).__name__}, not a string")
        text = (content or "").strip()
        if not text:
            raise Retryable(f"empty content (finish_reason={finish_reason})", empty=True)

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
