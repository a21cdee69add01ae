"""Request cache: a finished generation is never generated twice (datatrove's LLM-runner cache).

`CachedBackend(inner, store, prefix)` wraps any model backend. Each request is keyed by

    sha256(canonical JSON of {backend, model, revision, messages, temperature, top_p, max_tokens,
                              prompt_format, tokenizer (completion mode only), seed})

so a retried shard or a resumed run finds every request that already finished, and a changed
prompt, setting, model or seed is a different key (a miss, sent to the model).

Layout (in the run's staging area, `prefix` = RunContext.staging):

    <prefix>/llm-cache/<key[:2]>/<key>.json      {"v": 1, "key": ..., "result": LLMResult}

One small JSON object per finished request. Why not chunk files plus an index: per-request objects
need no index to merge or rewrite, concurrent workers never contend for one object, and a result is
durable the moment its request finishes (backends with `supports_on_result`, such as the
OpenAI-compatible one, report each result as it completes; the write happens on a thread pool
while the batch is still in flight), so a run killed mid-batch loses only the requests in flight.
The price is one GET per lookup: a batch's lookups go out together on a thread pool (`workers`,
default 32), so 256 lookups cost about 8 round trips, not 256 in series.

Only successful results are stored: a QuarantineError is never cached, so a request that failed
is sent again on the next run. A hit returns the stored result as it was (same text, same
generation record, `attempts` included) with only `id` set to the asking request's (identical
messages and seed under another clip id are the same generation). Unreadable entries count as
misses and are overwritten. The template backend is passed through uncached: it is free, and its
output depends on the clip id and attributes, which are not part of the key.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from schemas.config import LLMConfig
from schemas.records import QuarantineError
from storage.objectstore import NotFound, ObjectStore
from tasks.llm.base import LLMBackend, LLMRequest, LLMResult

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIR = "llm-cache"
UNCACHED_BACKENDS = frozenset({"template"})


# Finished responses go to the writer threads in groups (fewer hand-offs from the event loop), and
# never later than WRITE_DELAY_S after they finish: a killed run loses at most that much work.
WRITE_CHUNK = 16
WRITE_DELAY_S = 0.05


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN: the same value always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def request_key(req: LLMRequest, *, backend: str, model: str | None, revision: str | None,
                config: LLMConfig) -> str:
    """sha256 hex of everything that determines a generation."""
    material = {
        "v": CACHE_VERSION,
        "backend": backend,
        "model": model,
        "revision": revision,
        "messages": [m.model_dump(mode="json") for m in req.messages],
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_tokens,
        "prompt_format": config.prompt_format,
        "tokenizer": config.tokenizer if config.prompt_format == "completion" else None,
        "seed": req.seed,
    }
    return hashlib.sha256(canonical_json(material)).hexdigest()


def cache_key_path(prefix: str, key: str) -> str:
    """Object key of one cached result: `<prefix>/llm-cache/<key[:2]>/<key>.json`."""
    head = prefix.strip("/")
    return f"{head + '/' if head else ''}{CACHE_DIR}/{key[:2]}/{key}.json"


class CachedBackend:
    """An LLMBackend that answers finished requests from `store` and sends only the rest to `inner`."""

    def __init__(self, inner: LLMBackend, store: ObjectStore, prefix: str, config: LLMConfig | None = None,
                 *, workers: int = 32) -> None:
        cfg = config if config is not None else getattr(inner, "config", None)
        if not isinstance(cfg, LLMConfig):
            raise TypeError("CachedBackend needs the LLMConfig (sampling settings are part of the key): "
                             "pass config=, or wrap a backend that has .config")
        self.inner = inner
        self.name = inner.name
        self.store = store
        self.prefix = prefix
        self.config = cfg
        self.enabled = inner.name not in UNCACHED_BACKENDS
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                                           thread_name_prefix="llm-cache")
        self._lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "stored": 0, "unreadable": 0, "write_errors": 0}
        self._model: dict[str, str | None] | None = None

    # -- LLMBackend ---------------------------------------------------------------------------------

    def model_info(self) -> dict[str, str | None]:
        return self.inner.model_info()

    def preflight(self) -> None:
        self.inner.preflight()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def cache_stats(self) -> dict[str, int]:
        """hits / misses of lookups so far, plus results stored, unreadable entries and failed writes."""
        with self._lock:
            return dict(self._stats)

    def key(self, req: LLMRequest) -> str:
        if self._model is None:
            self._model = self.inner.model_info()
        return request_key(req, backend=self.inner.name, model=self._model.get("name"),
                           revision=self._model.get("revision"), config=self.config)

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMResult | QuarantineError]:
        requests = list(requests)
        if not self.enabled or not requests:
            return self.inner.generate(requests)
        keys = [self.key(r) for r in requests]
        found = list(self._pool.map(self._load, keys))  # all lookups of the batch at once
        out: list[LLMResult | QuarantineError | None] = [None] * len(requests)
        missing: list[int] = []
        for i, (req, hit) in enumerate(zip(requests, found, strict=True)):
            if hit is None:
                missing.append(i)
            else:
                out[i] = hit if hit.id == req.id else hit.model_copy(update={"id": req.id})
        with self._lock:
            self._stats["hits"] += len(requests) - len(missing)
            self._stats["misses"] += len(missing)
        if missing:
            for i, res in zip(missing, self._generate_and_store([requests[i] for i in missing],
                                                                [keys[i] for i in missing]), strict=True):
                out[i] = res
        assert all(r is not None for r in out)
        return [r for r in out if r is not None]

    # -- internals ----------------------------------------------------------------------------------

    def _generate_and_store(self, requests: list[LLMRequest], keys: list[str]) -> list[LLMResult | QuarantineError]:
        writes: list[concurrent.futures.Future[None]] = []

        pending: list[tuple[str, LLMResult]] = []
        guard = threading.Lock()
        timer: list[threading.Timer] = []

        def flush() -> None:
            with guard:
                if timer:
                    timer.pop().cancel()
                if pending:
                    writes.append(self._pool.submit(self._save_all, list(pending)))
                    pending.clear()

        def on_result(index: int, res: LLMResult | QuarantineError) -> None:
            if not isinstance(res, LLMResult):  # never a QuarantineError: failures are retried next run
                return
            with guard:
                pending.append((keys[index], res))
                full = len(pending) >= WRITE_CHUNK
                if not full and not timer:  # stored within WRITE_DELAY_S of finishing, whatever follows
                    timer.append(threading.Timer(WRITE_DELAY_S, flush))
                    timer[0].daemon = True
                    timer[0].start()
            if full:
                flush()

        try:
            if getattr(self.inner, "supports_on_result", False):
                results = self.inner.generate(requests, on_result=on_result)  # type: ignore[call-arg]
            else:  # results arrive together: one background task stores them all (no thread per write)
                results = self.inner.generate(requests)
                done = [(keys[i], r) for i, r in enumerate(results) if isinstance(r, LLMResult)]
                writes.append(self._pool.submit(self._save_all, done))
        finally:  # also when the batch fails: keep what finished
            flush()
            concurrent.futures.wait(writes)
        return results

    def _load(self, key: str) -> LLMResult | None:
        path = cache_key_path(self.prefix, key)
        try:
            raw = self.store.get_bytes(path)
        except NotFound:
            return None
        try:
            doc = json.loads(raw)
            if doc.get("v") != CACHE_VERSION or doc.get("key") != key:
                raise ValueError("version or key mismatch")
            return LLMResult.model_validate(doc["result"])
        except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
            log.warning("llm cache: unreadable entry %s (%s); regenerating", path, exc)
            with self._lock:
                self._stats["unreadable"] += 1
            return None

    def _save_all(self, items: list[tuple[str, LLMResult]]) -> None:
        for key, res in items:
            self._save(key, res)

    def _save(self, key: str, res: LLMResult) -> None:
        doc = {"v": CACHE_VERSION, "key": key, "result": res.model_dump(mode="json")}
        try:
            self.store.put_bytes(cache_key_path(self.prefix, key), canonical_json(doc), durable=False)
        except Exception as exc:  # noqa: BLE001 — a lost cache write costs a regeneration, never the row
            log.warning("llm cache: could not store %s for %s: %s: %s", key, res.id, type(exc).__name__, exc)
            with self._lock:
                self._stats["write_errors"] += 1
            return
        with self._lock:
            self._stats["stored"] += 1
