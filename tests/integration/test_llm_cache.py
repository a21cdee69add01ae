"""Request cache (resume without regenerating), replicas with load spreading and failover, and the
Prefect global concurrency limit per endpoint, all against local fake OpenAI-compatible servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

import flows.runners  # noqa: F401 - installs the Prefect endpoint limits (llm.endpoint_limit) for this process
from flows.endpoint_limits import endpoint_limit_name
from schemas.config import LLMConfig
from schemas.records import Generation, QuarantineError
from storage.objectstore import LocalStore
from tasks.llm import LLMRequest, LLMResult, build_messages
from tasks.llm.base import LLMUnavailable
from tasks.llm.cache import CachedBackend, scope_prefix, stored_keys
from tasks.llm.openai_compat import OpenAICompatBackend
from tests.support.paths import REPO

try:
    from tests.support.fake_llm_server import FakeLLMServer
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    from fake_llm_server import FakeLLMServer

PREFIX = "speechpairs/_staging/run-1"


def _req(clip: str, seed: int = 7, instruction: str = "What can you hear from the audio?") -> LLMRequest:
    return LLMRequest(id=clip, messages=build_messages(f"(Gender: Female) clip={clip}", instruction), seed=seed,
                      duration_s=2.0)


def _config(*servers: FakeLLMServer, **kw) -> LLMConfig:
    base = {"backend": "openai", "base_url": servers[0].base_url, "base_urls": [s.base_url for s in servers[1:]],
            "model": "llama-test", "timeout_s": 2.0, "backoff_s": 0.01, "max_retries": 3, "concurrency": 8}
    base.update(kw)
    return LLMConfig(**base)


@pytest.fixture
def servers() -> Iterator[list[FakeLLMServer]]:
    started: list[FakeLLMServer] = []
    for _ in range(3):
        started.append(FakeLLMServer(sleep_s=1.0).start())
    try:
        yield started
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture
def server(servers: list[FakeLLMServer]) -> FakeLLMServer:
    return servers[0]


def _cached(server: FakeLLMServer, store: LocalStore, **kw) -> CachedBackend:
    return CachedBackend(OpenAICompatBackend(_config(server, **kw)), store, PREFIX)


def _clips(server: FakeLLMServer) -> list[str]:
    return [s.clip or "" for s in server.seen]


# -- request cache -----------------------------------------------------------------------------------


def test_killed_after_half_rerun_sends_only_the_missing_half(server, tmp_path):
    store = LocalStore(tmp_path)
    reqs = [_req(f"c{i:02d}") for i in range(40)]
    server.scripts = {"c03": ["500", "ok"]}  # one request needed two attempts the first time

    first_backend = _cached(server, store)
    first = first_backend.generate(reqs[:20])  # the run is killed here
    assert all(isinstance(r, LLMResult) for r in first)
    assert len(server.seen) == 21 and first_backend.cache_stats()["misses"] == 20
    assert first[3].generation.attempts == 2

    again = _cached(server, store)  # a new process: nothing in memory
    out = again.generate(reqs)
    assert len(server.seen) == 21 + 20  # only the missing half went out
    assert sorted(_clips(server)[21:]) == [f"c{i:02d}" for i in range(20, 40)]
    assert [r.id for r in out] == [r.id for r in reqs]
    assert all(isinstance(r, LLMResult) for r in out)
    assert out[:20] == first  # identical results, attempts and latency included
    assert out[3].generation.attempts == 2
    assert again.cache_stats() == {"hits": 20, "misses": 20, "stored": 20, "unreadable": 0, "write_errors": 0}
    assert sorted(stored_keys(store, PREFIX)) == sorted(again.key(r) for r in reqs)  # each stored once
    assert all(k.startswith(f"{PREFIX}/llm-cache/all/") and k.endswith(".jsonl")
               for k in store.list(f"{PREFIX}/llm-cache/"))


# A separate process that runs one cached batch and is SIGKILLed in the middle of it.
_KILLED_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from schemas.config import LLMConfig
from storage.objectstore import LocalStore
from tasks.llm import LLMRequest
from tasks.llm.cache import CachedBackend
from tasks.llm.openai_compat import OpenAICompatBackend
from tests.support.paths import REPO
doc = json.loads(open(sys.argv[2]).read())
backend = CachedBackend(OpenAICompatBackend(LLMConfig(**doc["config"])), LocalStore(doc["store"]), doc["prefix"])
backend.generate([LLMRequest.model_validate(r) for r in doc["requests"]])
print("batch finished", flush=True)  # never reached: killed while half the batch is in flight
"""


def test_kill_9_mid_batch_rerun_sends_only_the_missing_half(server, tmp_path):
    """The real thing: a process SIGKILLed mid-batch keeps the half that finished; a new process
    sends only the other half (counted at the server)."""
    reqs = [_req(f"k{i:02d}") for i in range(40)]
    slow = {f"k{i:02d}" for i in range(20, 40)}
    server.sleep_s = 60.0  # the second half hangs until the process is killed
    server.scripts = {clip: ["sleep", "ok"] for clip in slow}
    job = tmp_path / "job.json"
    job.write_text(json.dumps({
        "config": _config(server, timeout_s=120.0, concurrency=40).model_dump(mode="json"),
        "store": str(tmp_path / "store"), "prefix": PREFIX,
        "requests": [r.model_dump(mode="json") for r in reqs]}))
    repo = REPO
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(repo), str(job)], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    store = LocalStore(tmp_path / "store")
    try:
        deadline = time.monotonic() + 60
        while (len(server.seen) < 40 or len(stored_keys(store, PREFIX)) < 20) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert b"batch finished" not in proc.stdout.read()  # type: ignore[union-attr]
    assert len(server.seen) == 40 and len(stored_keys(store, PREFIX)) == 20  # half finished, half in flight
    seen_at_kill = len(server.seen)

    again = _cached(server, store)  # a new process: nothing in memory
    out = again.generate(reqs)
    resent = [s.clip for s in server.seen[seen_at_kill:]]
    assert sorted(resent) == sorted(slow)  # exactly the unfinished half, each once
    assert all(isinstance(r, LLMResult) for r in out) and [r.id for r in out] == [r.id for r in reqs]
    assert again.cache_stats()["hits"] == 20 and again.cache_stats()["misses"] == 20


def test_results_are_stored_as_they_finish_not_at_batch_end(server, tmp_path):
    """A run killed mid-batch keeps everything that had finished: writes happen while the batch runs."""
    store = LocalStore(tmp_path)
    server.scripts = {"slow": ["sleep"]}
    backend = _cached(server, store, timeout_s=5.0)
    reqs = [_req(f"f{i}") for i in range(10)] + [_req("slow")]
    done: list[list[LLMResult | QuarantineError]] = []
    worker = threading.Thread(target=lambda: done.append(backend.generate(reqs)))
    worker.start()
    deadline = time.monotonic() + 0.9  # the slow request answers after 1.0 s
    while len(stored_keys(store, PREFIX)) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    stored_mid_batch = len(stored_keys(store, PREFIX))
    assert worker.is_alive()  # the batch is still running
    worker.join(timeout=10)
    assert stored_mid_batch == 10
    assert all(isinstance(r, LLMResult) for r in done[0])
    assert len(stored_keys(store, PREFIX)) == 11


def test_changed_prompt_temperature_seed_or_model_misses(server, tmp_path):
    store = LocalStore(tmp_path)
    _cached(server, store).generate([_req("a")])
    assert len(server.seen) == 1

    _cached(server, store).generate([_req("a")])
    assert len(server.seen) == 1  # same request: a hit

    _cached(server, store).generate([_req("a", instruction="Describe the speaker.")])
    assert len(server.seen) == 2  # changed prompt
    _cached(server, store, temperature=0.7).generate([_req("a")])
    assert len(server.seen) == 3  # changed temperature
    _cached(server, store).generate([_req("a", seed=8)])
    assert len(server.seen) == 4  # changed seed
    _cached(server, store, model="other-model").generate([_req("a")])
    assert len(server.seen) == 5  # changed model
    _cached(server, store, max_tokens=17).generate([_req("a")])
    assert len(server.seen) == 6  # changed max_tokens
    assert server.seen[-1].body["max_tokens"] == 17

    both = _cached(server, store)
    both.generate([_req("a"), _req("a", seed=8)])
    assert len(server.seen) == 6 and both.cache_stats()["hits"] == 2


def test_quarantine_is_not_cached_and_is_retried_next_run(server, tmp_path):
    store = LocalStore(tmp_path)
    server.scripts = {"bad": ["500", "500", "ok"]}
    first = _cached(server, store, max_retries=1)
    out = first.generate([_req("good"), _req("bad")])
    assert isinstance(out[0], LLMResult) and isinstance(out[1], QuarantineError)
    assert first.cache_stats()["stored"] == 1
    assert len(stored_keys(store, PREFIX)) == 1

    second = _cached(server, store, max_retries=1)
    out = second.generate([_req("good"), _req("bad")])
    assert [type(r) for r in out] == [LLMResult, LLMResult]
    assert [len(server.requests_for(c)) for c in ("good", "bad")] == [1, 3]  # bad was sent again
    assert second.cache_stats()["hits"] == 1

    _cached(server, store, max_retries=1).generate([_req("bad")])
    assert len(server.requests_for("bad")) == 3  # now it is cached


class _CountingBackend:
    """A model backend stand-in that records what it was asked to generate."""

    name = "counting"

    def __init__(self) -> None:
        self.config = LLMConfig()
        self.calls: list[list[str]] = []
        self.closed = False
        self.preflighted = False

    def model_info(self) -> dict[str, str | None]:
        return {"name": "tiny", "revision": "r1"}

    def preflight(self) -> None:
        self.preflighted = True

    def close(self) -> None:
        self.closed = True

    def generate(self, requests: Sequence[LLMRequest]) -> list[LLMResult | QuarantineError]:
        self.calls.append([r.id for r in requests])
        return [LLMResult(id=r.id, text=f"text {r.id}", generation=Generation(backend=self.name, seed=r.seed))
                for r in requests]


class _SlowStore(LocalStore):
    """A store whose reads take 50 ms (an S3 round trip), counting reads in flight."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def get_bytes(self, key: str) -> bytes:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(0.05)
            return super().get_bytes(key)
        finally:
            with self._lock:
                self.in_flight -= 1


def test_segments_are_read_in_parallel_and_hits_keep_ids(tmp_path):
    store = _SlowStore(tmp_path)
    reqs = [_req(f"p{i}") for i in range(256)]
    writer = CachedBackend(_CountingBackend(), store, PREFIX)
    for i in range(0, 256, 16):  # 16 earlier batches: 16 segments
        writer.generate(reqs[i:i + 16])
    assert len(list(store.list(scope_prefix(PREFIX)))) == 16
    again = CachedBackend(_CountingBackend(), store, PREFIX)
    t0 = time.monotonic()
    out = again.generate(reqs)
    assert time.monotonic() - t0 < 0.6  # 16 reads × 50 ms in series would be 0.8 s
    assert store.max_in_flight >= 8
    assert [r.id for r in out] == [r.id for r in reqs] and again.cache_stats()["hits"] == 256

    # the same messages and seed under another clip id are the same generation: a hit, with its own id
    twin = _req("p5").model_copy(update={"id": "twin"})
    [res] = again.generate([twin])
    assert res.id == "twin" and res.text == "text p5"


def test_scopes_are_separate_and_share_the_counters(tmp_path):
    store = LocalStore(tmp_path)
    inner = _CountingBackend()
    root = CachedBackend(inner, store, PREFIX)
    shard = root.scoped("shard-00003")
    shard.generate([_req("s")])
    assert stored_keys(store, PREFIX, "shard-00003") == [root.key(_req("s"))]
    assert stored_keys(store, PREFIX) == []
    root.generate([_req("s")])  # another scope: not looked up there
    assert inner.calls == [["s"], ["s"]]
    root.scoped("shard-00003").generate([_req("s")])  # a resumed shard finds its own result
    assert inner.calls == [["s"], ["s"]]
    assert root.cache_stats()["hits"] == 1 and root.cache_stats()["stored"] == 2
    shard.close()
    assert not inner.closed  # a view never closes the shared backend
    root.close()
    assert inner.closed


def test_unreadable_entry_is_a_miss_and_is_stored_again(tmp_path):
    store = LocalStore(tmp_path)
    inner = _CountingBackend()
    backend = CachedBackend(inner, store, PREFIX)
    req = _req("x")
    good = CachedBackend(_CountingBackend(), store, PREFIX)
    good.generate([_req("y")])
    store.put_bytes(f"{scope_prefix(PREFIX)}zz-000000.jsonl", b'{not json\n{"v": 1, "key": "k"}')
    [res] = backend.generate([req, _req("y")])[:1]
    assert isinstance(res, LLMResult) and inner.calls == [["x"]]  # y still read from its good segment
    assert backend.cache_stats()["unreadable"] == 2
    fresh = CachedBackend(_CountingBackend(), store, PREFIX)
    fresh.generate([req])
    assert fresh.cache_stats()["hits"] == 1  # stored again, now a hit for a new process


def test_delegates_and_template_is_passed_through(tmp_path):
    inner = _CountingBackend()
    backend = CachedBackend(inner, LocalStore(tmp_path), PREFIX)
    assert backend.model_info() == {"name": "tiny", "revision": "r1"} and backend.name == "counting"
    backend.preflight()
    assert inner.preflighted
    assert backend.generate([]) == []
    backend.close()
    assert inner.closed

    from tasks.llm.rules import RulesBackend as TemplateBackend

    tmpl = CachedBackend(TemplateBackend(), LocalStore(tmp_path), PREFIX)
    tmpl.generate([_req("t")])
    assert list(LocalStore(tmp_path).list(f"{PREFIX}/llm-cache/")) == []
    with pytest.raises(TypeError, match="LLMConfig"):
        CachedBackend(object(), LocalStore(tmp_path), PREFIX)  # type: ignore[arg-type]


# -- replicas ----------------------------------------------------------------------------------------


def test_requests_are_spread_over_replicas(servers):
    for srv in servers:
        srv.ok_delay_s = 0.01
    backend = OpenAICompatBackend(_config(*servers, concurrency=6))
    assert backend.base_urls == [s.base_url for s in servers]
    out = backend.generate([_req(f"r{i}") for i in range(60)])
    assert all(isinstance(r, LLMResult) for r in out) and [r.id for r in out] == [f"r{i}" for i in range(60)]
    counts = [len(s.seen) for s in servers]
    assert sum(counts) == 60 and min(counts) >= 10, counts


def test_dead_replica_loses_no_requests_and_fails_preflight(servers):
    dead = servers[1]
    dead.stop()
    backend = OpenAICompatBackend(_config(*servers, concurrency=6))
    with pytest.raises(LLMUnavailable, match=dead.base_url.replace(".", r"\.")):
        backend.preflight()
    out = backend.generate([_req(f"d{i}") for i in range(60)])
    assert all(isinstance(r, LLMResult) for r in out), [r for r in out if not isinstance(r, LLMResult)]
    assert len(servers[0].seen) + len(servers[2].seen) == 60
    assert max(r.generation.attempts for r in out if isinstance(r, LLMResult)) <= 2


def test_replica_dying_mid_run_fails_over(servers):
    servers[0].fail_after = 5  # answers 5 requests, then drops every connection
    backend = OpenAICompatBackend(_config(*servers, concurrency=6))
    out = backend.generate([_req(f"m{i}") for i in range(60)])
    assert all(isinstance(r, LLMResult) for r in out)
    assert len(servers[0].seen) == 5 and servers[0].refused >= 1
    assert len(servers[1].seen) + len(servers[2].seen) == 55


def test_endpoint_limit_name():
    assert endpoint_limit_name("http://127.0.0.1:8000/v1") == "llm-endpoint:127.0.0.1:8000"
    assert endpoint_limit_name("https://llm.example.org/v1/") == "llm-endpoint:llm.example.org:443"


# -- Prefect global concurrency limit per endpoint -----------------------------------------------------


def _limit(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def test_endpoint_limit_holds_across_workers(prefect_harness, server):
    server.ok_delay_s = 0.05
    cfg = _config(server, concurrency=8, endpoint_limit=4)
    results: dict[int, list[LLMResult | QuarantineError]] = {}

    def worker(k: int) -> None:
        results[k] = OpenAICompatBackend(cfg).generate([_req(f"w{k}-{i}") for i in range(24)])

    threads = [threading.Thread(target=worker, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [1, 2]
    assert all(isinstance(r, LLMResult) for k in results for r in results[k])
    assert len(server.seen) == 48
    assert 2 <= server.max_in_flight <= 4, server.max_in_flight
    limit = _limit(endpoint_limit_name(server.base_url))
    assert limit.limit == 4 and limit.active_slots == 0  # created by the backend, every lease given back


def test_endpoint_limit_leases_slots_in_chunks(prefect_harness, server):
    server.ok_delay_s = 0.02
    backend = OpenAICompatBackend(_config(server, concurrency=32, endpoint_limit=100))
    backend.preflight()  # creates (or updates) the limit
    assert _limit(endpoint_limit_name(server.base_url)).limit == 100
    out = backend.generate([_req(f"h{i}") for i in range(128)])
    assert all(isinstance(r, LLMResult) for r in out)
    assert server.max_in_flight <= 32
    assert 1 <= backend.slot_leases <= 8  # not one Prefect acquisition per request
    assert _limit(endpoint_limit_name(server.base_url)).active_slots == 0


def test_endpoint_limit_that_cannot_be_held_fails_the_batch(server, monkeypatch):
    """No request goes out without its slot: a Prefect failure fails the call, it quarantines nothing."""
    from flows import endpoint_limits as openai_compat

    async def no_prefect(self, size):
        raise LLMUnavailable("cannot hold a slot of the Prefect global concurrency limit 'x': API down")

    async def nothing(self):
        return None

    monkeypatch.setattr(openai_compat._EndpointSlots, "_try_lease", no_prefect)
    monkeypatch.setattr(OpenAICompatBackend, "_ensure_limits", nothing)
    backend = OpenAICompatBackend(_config(server, endpoint_limit=4))
    with pytest.raises(LLMUnavailable, match="API down"):
        backend.generate([_req(f"u{i}") for i in range(12)])
    assert server.seen == []


class _ReportingBackend(_CountingBackend):
    """Reports each result as it finishes (like the OpenAI-compatible backend), a little apart."""

    supports_on_result = True

    def generate(self, requests: Sequence[LLMRequest], on_result=None) -> list[LLMResult | QuarantineError]:
        out = super().generate(requests)
        for i, res in enumerate(out):
            time.sleep(0.001)
            if on_result is not None:
                on_result(i, res)
        return out


def test_writes_use_a_few_long_lived_threads_and_end_with_close(tmp_path):
    """Results are handed to a fixed set of writer threads (no thread per group or per write), which
    end when the cache is closed; every result is stored, in groups of at most 16."""
    store = LocalStore(tmp_path)
    before = {t.ident for t in threading.enumerate()}
    backend = CachedBackend(_ReportingBackend(), store, PREFIX, writers=2)
    peak: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak.append(len([t for t in threading.enumerate() if t.ident not in before]))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    out = backend.generate([_req(f"w{i}") for i in range(200)])
    stop.set()
    watcher.join()
    assert len(out) == 200 and len(stored_keys(store, PREFIX)) == 200
    segments = list(store.list(scope_prefix(PREFIX)))
    assert 200 / 16 <= len(segments) < 200
    assert max(peak) <= 3  # the watcher + 2 writers
    backend.close()
    assert not [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("llm-cache")]
