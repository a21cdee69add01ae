"""The LLM backend interface and its table: backends by name (the `rules` backend and its old name
`template`), hooks with defaults, duck-typed backends adapted in one place, and the endpoint-slot
provider the OpenAI-compatible backend is given instead of importing Prefect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from schemas.config import LLMConfig, parse_config
from schemas.records import Generation, QuarantineError
from storage.objectstore import LocalStore
from tasks.llm import BACKENDS, LLMBackend, LLMRequest, LLMResult, build_messages, make_backend
from tasks.llm import slots as slot_registry
from tasks.llm.base import LLMUnavailable, as_backend
from tasks.llm.cache import CachedBackend
from tasks.llm.openai_compat import OpenAICompatBackend
from tasks.llm.rules import RulesBackend
from tests.support.fake_llm_server import FakeLLMServer
from tests.support.paths import REPO


def _python(code: str) -> str:
    """What `code` prints in a fresh interpreter (which modules a path imports shows only there)."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _req(clip: str, seed: int = 3) -> LLMRequest:
    return LLMRequest(id=clip, messages=build_messages(f"(Gender: Female) clip={clip}", "Describe it."), seed=seed,
                      attributes={"Gender": "Female", "Emotion": "Happy"}, transcript="hello there", duration_s=2.0)


# -- the table and the rename ----------------------------------------------------------------------


def test_rules_is_the_default_and_template_its_old_name_makes_the_same_run() -> None:
    assert set(BACKENDS) == {"rules", "openai", "transformers", "vllm"}
    assert LLMConfig().backend == "rules"
    old, new = make_backend(LLMConfig(backend="template")), make_backend(LLMConfig(backend="rules"))
    assert isinstance(old, RulesBackend) and isinstance(new, RulesBackend)
    reqs = [_req(f"c{i}", seed=i) for i in range(6)]
    assert old.generate(reqs) == new.generate(reqs)  # identical rows, generation record included
    assert new.model_info() == {"name": "template", "revision": "1"}  # the lineage name stays
    hashes = {parse_config({"sources": [{"path": "x"}], **extra}, environ={}).config_hash()
              for extra in ({}, {"llm": {"backend": "template"}}, {"llm": {"backend": "rules"}})}
    assert len(hashes) == 1  # an old config keeps its hash: its run id and finished shards
    assert parse_config({"sources": [{"path": "x"}], "llm": {"backend": "openai", "base_url": "http://h/v1",
                                                            "model": "m"}}, environ={}).config_hash() not in hashes


def test_a_rules_run_imports_no_http_client_nor_model_runtime() -> None:
    code = ("import sys\nfrom schemas.config import LLMConfig\nfrom tasks.llm import LLMRequest, make_backend\n"
            "from tasks.llm.messages import build_messages\n"
            "b = make_backend(LLMConfig())\nb.preflight()\n"
            "b.generate([LLMRequest(id='a', messages=build_messages('s', 'q'), seed=1, duration_s=1.0)])\n"
            "print(sorted(m for m in ('aiohttp', 'httpx', 'torch', 'transformers', 'vllm', 'prefect') "
            "if m in sys.modules))\n")
    assert _python(code) == "[]"


# -- hooks with defaults, and duck-typed backends -------------------------------------------------


class _Minimal(LLMBackend):
    name = "minimal"

    def model_info(self) -> dict[str, str | None]:
        return {"name": "minimal", "revision": None}

    def generate(self, requests: Sequence[LLMRequest], on_result=None) -> list[LLMResult | QuarantineError]:
        return [LLMResult(id=r.id, text="x", generation=Generation(backend=self.name)) for r in requests]


def test_hooks_have_defaults_and_pass_through_the_request_cache(tmp_path: Path) -> None:
    minimal = _Minimal()
    minimal.preflight()
    minimal.close()
    assert minimal.render(_req("a")) is None and minimal.cacheable
    cached = CachedBackend(RulesBackend(), LocalStore(tmp_path), "p")
    assert cached.render(_req("a")) is None and not cached.enabled  # the rules backend is passed through


class _Duck:
    """The interface's shape without the base class (as test doubles and plugins are written)."""

    name = "duck"

    def __init__(self, streams: bool) -> None:
        self.supports_on_result = streams
        self.returned = False
        self.closed = False

    def model_info(self) -> dict[str, str | None]:
        return {"name": "duck", "revision": None}

    def preflight(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def generate(self, requests: Sequence[LLMRequest], on_result=None) -> list[LLMResult | QuarantineError]:
        self.returned = False
        out: list[LLMResult | QuarantineError] = []
        for i, r in enumerate(requests):
            out.append(LLMResult(id=r.id, text=f"t{i}", generation=Generation(backend=self.name)))
            if on_result is not None:
                on_result(i, out[-1])
        self.returned = True
        return out


@pytest.mark.parametrize("streams", [True, False])
def test_a_duck_typed_backend_is_adapted_once(streams: bool) -> None:
    duck = _Duck(streams)
    adapted = as_backend(duck)
    assert isinstance(adapted, LLMBackend) and as_backend(adapted) is adapted
    assert adapted.name == "duck" and adapted.config is None and adapted.render(_req("a")) is None
    reported: list[tuple[int, bool]] = []
    out = adapted.generate([_req("a"), _req("b")], lambda i, res: reported.append((i, duck.returned)))
    assert [r.id for r in out] == ["a", "b"]
    # A backend that says it streams reports while its batch runs; another one once the batch is back.
    assert reported == [(0, not streams), (1, not streams)]
    adapted.close()
    assert duck.closed


# -- the endpoint-slot provider ---------------------------------------------------------------------


class _CountingSlots:
    """A slot provider in plain asyncio: `limit` slots per replica, counting what it is asked."""

    def __init__(self) -> None:
        self.prepared: list[tuple[list[str], int]] = []
        self.max_held = 0
        self.opened = 0
        self.closed = 0

    async def prepare(self, base_urls: Sequence[str], limit: int) -> None:
        self.prepared.append((list(base_urls), limit))

    def open(self, base_urls: Sequence[str], limit: int) -> _CountingPool:
        self.opened += 1
        return _CountingPool(self, limit)


class _CountingPool:
    def __init__(self, owner: _CountingSlots, limit: int) -> None:
        self.owner = owner
        self.sem = asyncio.Semaphore(limit)
        self.held = 0
        self.leases = 0

    @contextlib.asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        async with self.sem:
            self.leases += 1
            self.held += 1
            self.owner.max_held = max(self.owner.max_held, self.held)
            try:
                yield
            finally:
                self.held -= 1

    def slot(self, base_url: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._hold()

    async def aclose(self) -> None:
        self.owner.closed += 1


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    srv = FakeLLMServer().start()
    srv.ok_delay_s = 0.02
    try:
        yield srv
    finally:
        srv.stop()


def _config(server: FakeLLMServer, **kw: object) -> LLMConfig:
    return LLMConfig(**{"backend": "openai", "base_url": server.base_url, "model": "llama-test", "timeout_s": 5.0,
                        "backoff_s": 0.01, "concurrency": 8, **kw})


def test_the_openai_backend_holds_the_slots_it_is_given(server: FakeLLMServer) -> None:
    provider = _CountingSlots()
    backend = OpenAICompatBackend(_config(server, endpoint_limit=3), slots=provider)
    backend.preflight()
    assert provider.prepared == [([server.base_url], 3)]
    out = backend.generate([_req(f"s{i}") for i in range(20)])
    assert all(isinstance(r, LLMResult) for r in out)
    assert 1 <= provider.max_held <= 3 and server.max_in_flight <= 3
    assert (provider.opened, provider.closed, backend.slot_leases) == (1, 1, 20)
    assert provider.prepared == [([server.base_url], 3)]  # prepared once per backend


def test_an_endpoint_limit_without_a_provider_fails_the_batch_not_the_clips(
        server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slot_registry, "_installed", None)
    backend = OpenAICompatBackend(_config(server, endpoint_limit=2))
    backend.preflight()  # the CLI's pre-flight runs before the flow installs the Prefect provider
    with pytest.raises(LLMUnavailable, match=r"llm\.endpoint_limit=2 needs a slot provider"):
        backend.generate([_req("u")])
    assert server.seen == []  # no request went out without its slot


def test_the_openai_backend_imports_no_prefect(server: FakeLLMServer) -> None:
    code = ("import json, sys\nfrom schemas.config import LLMConfig\nfrom tasks.llm.openai_compat import "
            "OpenAICompatBackend\nfrom tasks.llm import LLMRequest\nfrom tasks.llm.messages import build_messages\n"
            f"b = OpenAICompatBackend(LLMConfig(**json.loads({json.dumps(json.dumps(_config(server).model_dump()))})))\n"
            "b.preflight()\nr = b.generate([LLMRequest(id='a', messages=build_messages('clip=a', 'q'), seed=1, "
            "duration_s=1.0)])\nprint(type(r[0]).__name__, 'prefect' in sys.modules)\n")
    assert _python(code).split() == ["LLMResult", "False"]
