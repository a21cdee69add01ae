"""Request cache: a finished generation is never generated twice (datatrove's LLM-runner cache).

`CachedBackend(inner, store, prefix)` wraps any model backend. Each request is keyed by

    sha256(canonical JSON of {backend, model, revision, messages, temperature, top_p, max_tokens,
                              prompt_format, tokenizer (completion mode only), seed})

so a retried shard or a resumed run finds every request that already finished, and a changed
prompt, setting, model or seed is a different key (a miss, sent to the model).

Layout (in the run's staging area, `prefix` = RunContext.staging):

    <prefix>/llm-cache/<scope>/<writer>-<seq>.jsonl   one line per result: {"v", "key", "result"}

Finished results are written in small segments (a group of up to 16 results, never later than 50 ms
after they finish), each a new object named by its writer: concurrent workers never contend for an
object, there is no index to merge, and a run killed mid-batch loses only what was in flight
(backends that stream, such as the OpenAI-compatible one, report each result as it completes).
Groups are formed and written by a few long-lived threads (`_SegmentWriter`, `writers`, default 4)
that the request loop only hands results to (why, with the figures: docs/decisions.md).
A scope is what one process looks up: the pipeline scopes the cache per shard (`scoped`), so a
resumed shard reads its own segments (bounded by the shard size), never the whole run's; segments
of a scope are listed and read once, in parallel on a thread pool (`workers`, default 32).

Only successful results are stored: a QuarantineError is never cached, so a request that failed
is sent again on the next run. A hit returns the stored result as it was (same text, same
generation record, `attempts` included) with only `id` set to the asking request's (identical
messages and seed under another clip id are the same generation). Unreadable entries count as
misses (regenerated and stored again). A backend that is not `cacheable` (the `rules` backend: free,
and its output depends on the clip id and attributes, which are not part of the key) is passed through.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import hashlib
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from schemas.config import LLMConfig
from schemas.records import QuarantineError
from storage.layout import cache_scope_prefix
from storage.objectstore import NotFound, ObjectStore
from tasks.llm.base import LLMBackend, LLMRequest, LLMResult, OnResult, as_backend

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_SCOPE = "all"


# Finished responses are written in groups (one object each), never later than WRITE_DELAY_S after
# they finish: a killed run loses at most that much work.
WRITE_CHUNK = 16
WRITE_DELAY_S = 0.05

Item = tuple[str, LLMResult]  # (request key, result)


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


def scope_prefix(prefix: str, scope: str = DEFAULT_SCOPE) -> str:
    """Where the segments of one scope live: `<prefix>/llm-cache/<scope>/`."""
    return cache_scope_prefix(prefix, scope)


def stored_keys(store: ObjectStore, prefix: str, scope: str = DEFAULT_SCOPE) -> list[str]:
    """Keys of every result stored in a scope, in segment order (for inspection and tests)."""
    out: list[str] = []
    for key in store.list(scope_prefix(prefix, scope)):
        out += [json.loads(line)["key"] for line in store.get_bytes(key).splitlines() if line.strip()]
    return out


class CachedBackend(LLMBackend):
    """An LLMBackend that answers finished requests from `store` and sends only the rest to `inner`.

    generate(requests, on_result) reports hits at once and misses as the inner backend finishes them."""

    config: LLMConfig

    def __init__(self, inner: LLMBackend, store: ObjectStore, prefix: str, config: LLMConfig | None = None,
                 *, workers: int = 32, writers: int = 4, scope: str = DEFAULT_SCOPE) -> None:
        model = as_backend(inner)
        cfg = config if config is not None else model.config
        if not isinstance(cfg, LLMConfig):
            raise TypeError("CachedBackend needs the LLMConfig (sampling settings are part of the key): "
                             "pass config=, or wrap a backend that has .config")
        self.inner = model
        self.name = model.name
        self.store = store
        self.prefix = prefix
        self.config = cfg
        self.scope = scope
        self.enabled = model.cacheable
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                                           thread_name_prefix="llm-cache-read")
        self._segments = _SegmentWriter(writers)
        self._lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "stored": 0, "unreadable": 0, "write_errors": 0}
        self._model: dict[str, str | None] | None = None
        self._owner = True  # closes the pool and the inner backend; scoped views do not
        self._reset_scope_state()

    def _reset_scope_state(self) -> None:
        self._index: dict[str, LLMResult] | None = None  # this scope's stored results, read once
        self._index_lock = threading.Lock()
        self._writer = uuid.uuid4().hex[:16]
        self._seq = itertools.count()

    def scoped(self, scope: str) -> CachedBackend:
        """A view of this cache that stores and looks up in `scope` (e.g. one shard), sharing the
        model backend, the threads and the counters."""
        view = copy.copy(self)
        view.scope = scope
        view._owner = False
        view._reset_scope_state()
        return view

    # -- LLMBackend ---------------------------------------------------------------------------------

    def model_info(self) -> dict[str, str | None]:
        return self.inner.model_info()

    def preflight(self) -> None:
        self.inner.preflight()

    def close(self) -> None:
        if not self._owner:
            return
        self._segments.close()
        self._pool.shutdown(wait=True)
        self.inner.close()

    def render(self, request: LLMRequest) -> str | None:
        return self.inner.render(request)

    def cache_stats(self) -> dict[str, int]:
        """hits / misses of lookups so far, plus results stored, unreadable entries and failed writes."""
        with self._lock:
            return dict(self._stats)

    def key(self, req: LLMRequest) -> str:
        if self._model is None:
            self._model = self.inner.model_info()
        return request_key(req, backend=self.inner.name, model=self._model.get("name"),
                           revision=self._model.get("revision"), config=self.config)

    def generate(self, requests: Sequence[LLMRequest],
                 on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        requests = list(requests)
        if not requests:
            return []
        if not self.enabled:
            return self.inner.generate(requests, on_result)
        keys = [self.key(r) for r in requests]
        index = self._load_index()
        out: list[LLMResult | QuarantineError | None] = [None] * len(requests)
        missing: list[int] = []
        for i, (req, key) in enumerate(zip(requests, keys, strict=True)):
            hit = index.get(key)
            if hit is None:
                missing.append(i)
            else:
                found = hit if hit.id == req.id else hit.model_copy(update={"id": req.id})
                out[i] = found
                if on_result is not None:
                    on_result(i, found)
        with self._lock:
            self._stats["hits"] += len(requests) - len(missing)
            self._stats["misses"] += len(missing)
        if missing:
            generated = self._generate_and_store([requests[i] for i in missing], [keys[i] for i in missing],
                                                 on_result and (lambda j, res: on_result(missing[j], res)))
            for i, res in zip(missing, generated, strict=True):
                out[i] = res
        assert all(r is not None for r in out)
        return [r for r in out if r is not None]

    # -- internals ----------------------------------------------------------------------------------

    def _load_index(self) -> dict[str, LLMResult]:
        """Every result stored in this scope, by key: its segments listed and read once, in parallel."""
        with self._index_lock:
            if self._index is None:
                index: dict[str, LLMResult] = {}
                segments = list(self.store.list(scope_prefix(self.prefix, self.scope)))
                for entries in self._pool.map(self._read_segment, segments):
                    index.update(entries)
                self._index = index
            return self._index

    def _read_segment(self, path: str) -> dict[str, LLMResult]:
        try:
            raw = self.store.get_bytes(path)
        except NotFound:
            return {}
        entries: dict[str, LLMResult] = {}
        bad = 0
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                if doc.get("v") != CACHE_VERSION or not isinstance(doc.get("key"), str):
                    raise ValueError("version or key missing")
                entries[doc["key"]] = LLMResult.model_validate(doc["result"])
            except (ValueError, KeyError, TypeError, AttributeError, ValidationError):
                bad += 1
        if bad:
            log.warning("llm cache: %d unreadable entries in %s; they will be regenerated", bad, path)
            with self._lock:
                self._stats["unreadable"] += bad
        return entries

    def _generate_and_store(self, requests: list[LLMRequest], keys: list[str],
                            then: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        def store(index: int, res: LLMResult | QuarantineError) -> None:
            if isinstance(res, LLMResult):  # never a QuarantineError: failures are retried next run
                self._segments.add(self._save_segment, (keys[index], res))
            if then is not None:
                then(index, res)

        try:
            return self.inner.generate(requests, store)
        finally:  # also when the batch fails: keep what finished
            self._segments.flush(self._save_segment)

    def _save_segment(self, items: list[Item]) -> None:
        # One JSON object per line; the result serialised by pydantic-core (a key is hex: no escaping).
        body = b"\n".join(b'{"v":%d,"key":"%s","result":%s}' % (CACHE_VERSION, key.encode(),
                                                                 res.model_dump_json().encode())
                          for key, res in items)
        path = f"{scope_prefix(self.prefix, self.scope)}{self._writer}-{next(self._seq):06d}.jsonl"
        try:
            self.store.put_bytes(path, body, durable=False)
        except Exception as exc:  # noqa: BLE001 — a lost cache write costs a regeneration, never the row
            log.warning("llm cache: could not store %d results in %s: %s: %s", len(items), path,
                        type(exc).__name__, exc)
            with self._lock:
                self._stats["write_errors"] += len(items)
            return
        with self._index_lock:
            if self._index is not None:
                self._index.update(items)
        with self._lock:
            self._stats["stored"] += len(items)


class _SegmentWriter:
    """Groups finished results per destination and writes each group from a few long-lived threads.

    `add(save, item)` costs the caller (the request loop) one lock and a list append; a group goes
    to `save` once it holds WRITE_CHUNK items or its first item is WRITE_DELAY_S old, whichever
    comes first: an idle writer thread sleeps until the oldest open group's deadline. `flush(save)`
    writes what is still open for that destination and waits until all of it is saved. Threads
    start on first use and end at `close()`.
    """

    def __init__(self, threads: int) -> None:
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # writers wait here for a group to fill or fall due
        self._saved = threading.Condition(lock)  # flush() waits here for its groups to be written
        self._open: dict[Callable[[list[Item]], None], tuple[float, list[Item]]] = {}
        self._ready: collections.deque[tuple[Callable[[list[Item]], None], list[Item]]] = collections.deque()
        self._unsaved: collections.Counter[Callable[[list[Item]], None]] = collections.Counter()
        self._size = max(1, threads)
        self._threads: list[threading.Thread] = []
        self._closed = False

    def add(self, save: Callable[[list[Item]], None], item: Item) -> None:
        with self._work:
            if self._closed:
                raise RuntimeError("the request cache is closed")
            if not self._threads:
                self._start()
            opened = self._open.get(save)
            if opened is None:
                opened = self._open[save] = (time.monotonic(), [])
            opened[1].append(item)
            self._unsaved[save] += 1
            if len(opened[1]) >= WRITE_CHUNK:
                self._ready.append((save, self._open.pop(save)[1]))
                self._work.notify()
            elif len(opened[1]) == 1:
                self._work.notify()  # an idle writer now has a deadline to sleep until

    def flush(self, save: Callable[[list[Item]], None]) -> None:
        with self._work:
            opened = self._open.pop(save, None)
            if opened is not None:
                self._ready.append((save, opened[1]))
                self._work.notify()
            while self._unsaved[save] > 0:
                self._saved.wait()
            del self._unsaved[save]

    def close(self) -> None:
        with self._work:
            for save, (_, items) in self._open.items():
                self._ready.append((save, items))
            self._open.clear()
            self._closed = True
            self._work.notify_all()
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()

    def _start(self) -> None:
        for n in range(self._size):
            thread = threading.Thread(target=self._run, name=f"llm-cache-write-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _next(self) -> tuple[Callable[[list[Item]], None], list[Item]] | None:
        """The next group to write (None: closed and drained), waiting for one to fill or fall due."""
        with self._work:
            while True:
                if self._ready:
                    return self._ready.popleft()
                if self._open:
                    save, (started, items) = min(self._open.items(), key=lambda kv: kv[1][0])
                    due = started + WRITE_DELAY_S - time.monotonic()
                    if due <= 0:
                        del self._open[save]
                        return save, items
                    self._work.wait(due)
                elif self._closed:
                    return None
                else:
                    self._work.wait()

    def _run(self) -> None:
        while (group := self._next()) is not None:
            save, items = group
            try:
                save(items)
            except Exception:
                log.exception("llm cache: could not write %d results", len(items))
            finally:
                with self._saved:
                    self._unsaved[save] -= len(items)
                    self._saved.notify_all()
