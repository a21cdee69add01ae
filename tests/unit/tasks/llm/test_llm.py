"""LLM stage backends: template (deterministic) and OpenAI-compatible HTTP against a scripted local server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from schemas.config import LLMConfig
from schemas.records import QuarantineError, ReasonCode, Stage
from tasks.llm import LLMBackend, LLMRequest, LLMResult, build_messages, make_backend
from tasks.llm.http import retry_after_seconds as _retry_after_seconds
from tasks.llm.openai_compat import OpenAICompatBackend
from tasks.llm.rules import RulesBackend as TemplateBackend
from tasks.llm.rules import variant

try:
    from tests.support.fake_llm_server import FakeLLMServer
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    from fake_llm_server import FakeLLMServer

INSTRUCTION = "What can you hear from the audio?"
KEY_ENV = "SPEECHPAIRS_TEST_LLM_KEY"
SECRET = "sk-test-5ecret-do-not-leak"


@pytest.fixture
def server():
    srv = FakeLLMServer(sleep_s=1.5).start()
    try:
        yield srv
    finally:
        srv.stop()


def _config(server: FakeLLMServer, **kw) -> LLMConfig:
    base = {"backend": "openai", "base_url": server.base_url, "model": "llama-test", "api_key_env": KEY_ENV,
            "timeout_s": 0.5, "backoff_s": 0.01, "max_retries": 5, "concurrency": 4, "temperature": 0.05,
            "top_p": 0.9, "max_tokens": 64}
    base.update(kw)
    return LLMConfig(**base)


def _req(clip: str, system: str | None = None, seed: int = 7, **kw) -> LLMRequest:
    seed_text = f"[00:00-00:03] the food is really good (Gender: Female) clip={clip}"
    return LLMRequest(id=clip, messages=build_messages(seed_text, INSTRUCTION, system), seed=seed,
                      attributes=kw.pop("attributes", {"Gender": "Female"}), transcript="the food is really good",
                      duration_s=3.0, **kw)


# -- messages -----------------------------------------------------------------------------------------


def test_build_messages_desta2_layout():
    msgs = build_messages("SEED", "INSTR")
    assert [(m.role, m.content) for m in msgs] == [("user", "SEED\nINSTR")]
    msgs = build_messages("SEED", "INSTR", system_prompt="SYS")
    assert [(m.role, m.content) for m in msgs] == [("system", "SYS"), ("user", "SEED\nINSTR")]


# -- template backend ---------------------------------------------------------------------------------


def _treq(clip="c1", seed=0, attributes=None, transcript="the food is really good", duration_s=3.2):
    attrs = {"Gender": "Female", "Pitch": "High", "Speaking speed": "Fast", "Emotion": "Happy"}
    return LLMRequest(id=clip, messages=build_messages("s", INSTRUCTION), seed=seed,
                      attributes=attrs if attributes is None else attributes, transcript=transcript,
                      duration_s=duration_s)


def test_template_mentions_attributes_and_transcript():
    backend = make_backend(LLMConfig())
    assert isinstance(backend, TemplateBackend) and isinstance(backend, LLMBackend)
    [res] = backend.generate([_treq()])
    assert isinstance(res, LLMResult)
    text = res.text
    for word in ("female", "happy tone", "high-pitched", "fast pace", '"the food is really good"', "3-second"):
        assert word in text, (word, text)
    assert "Female" not in text and "Happy" not in text  # attribute words are lower-cased
    g = res.generation
    assert (g.backend, g.model, g.revision, g.seed, g.finish_reason, g.attempts) == (
        "template", "template", "1", 0, "stop", 1)
    assert g.temperature is None and g.top_p is None
    assert g.completion_tokens == len(text.split())
    assert backend.model_info() == {"name": "template", "revision": "1"}


def test_template_is_deterministic_and_varies_by_id_and_seed():
    backend = TemplateBackend()
    reqs = [_treq(clip=f"clip-{i}") for i in range(40)]
    first = [r.text for r in backend.generate(reqs)]
    assert first == [r.text for r in TemplateBackend().generate(reqs)]
    openings = {t.split(",")[0].split(" female")[0] for t in first}
    assert len(openings) >= 3, openings  # several phrasings, not one template
    by_seed = {TemplateBackend().generate([_treq(clip="x", seed=s)])[0].text for s in range(20)}
    assert len(by_seed) >= 2
    assert variant("x", 1, 4) == variant("x", 1, 4)  # hashlib, not the salted built-in hash()


def test_template_missing_attributes_and_no_transcript():
    [res] = TemplateBackend().generate([_treq(attributes={"Emotion": "Angry", "Gender": "unknown"},
                                              transcript=None, duration_s=float("nan"))])
    text = res.text
    assert '"' not in text
    assert "an angry tone" in text
    for absent in ("unknown", "None", "pitch", "pace", "second", "male"):
        assert absent not in text, (absent, text)
    [bare] = TemplateBackend().generate([_treq(attributes={}, transcript="  ", duration_s=1.0)])
    assert "a speaker" in bare.text and "tone" not in bare.text and '"' not in bare.text


def test_template_extra_attributes_and_ages():
    attrs = {"Age": "18", "Gender": "Male", "Accent": "english", "Noise level": "Very noisy",
             "Reverberation": "35 dB (C50)", "Intent": "Greeting", "Duration": "5 seconds", "Volume": "Very quiet"}
    [res] = TemplateBackend().generate([_treq(attributes=attrs, transcript='"hello there"')])
    text = res.text
    assert "an 18-year-old male English speaker" in text
    assert '"hello there"' in text and '""' not in text  # stray quotes removed
    assert "noise level is very noisy" in text and "reverberation is 35 dB (C50)" in text
    assert "in a very quiet voice" in text
    assert "intent is greeting" in text and "5 seconds" not in text


# -- OpenAI-compatible backend --------------------------------------------------------------------------


def test_retries_every_failure_kind_then_succeeds(server):
    server.scripts = {
        "a": ["500", "429", "sleep", "malformed", "ok"],
        "b": ["nochoices", "empty", "503", "ok"],
        "c": ["drop", "ok"],
        "d": ["ok"],
    }
    backend = OpenAICompatBackend(_config(server))
    reqs = [_req(c) for c in ["a", "b", "c", "d"]]
    out = backend.generate(reqs)
    assert [r.id for r in out] == ["a", "b", "c", "d"]  # same order, nothing lost
    assert all(isinstance(r, LLMResult) for r in out), out
    assert [r.generation.attempts for r in out] == [5, 4, 2, 1]
    assert [len(server.requests_for(c)) for c in "abcd"] == [5, 4, 2, 1]
    a = out[0]
    assert a.text == "Response for a."
    g = a.generation
    assert (g.backend, g.model, g.revision, g.finish_reason) == ("openai", "fake-served-model", None, "stop")
    assert (g.temperature, g.top_p, g.max_tokens, g.seed) == (0.05, 0.9, 64, 7)
    assert g.completion_tokens == 3 and g.prompt_tokens and g.prompt_tokens > 5
    assert g.latency_s is not None and 0 <= g.latency_s < 0.5


def test_always_failing_request_is_quarantined_others_succeed(server):
    server.scripts = {"bad": ["500"], "mute": ["empty"]}
    backend = OpenAICompatBackend(_config(server, max_retries=2))
    out = backend.generate([_req("ok1"), _req("bad"), _req("mute"), _req("ok2")])
    assert [type(r) for r in out] == [LLMResult, QuarantineError, QuarantineError, LLMResult]
    bad, mute = out[1], out[2]
    assert bad.stage is Stage.llm and bad.reason is ReasonCode.llm_unavailable  # transient: a re-run retries it
    assert bad.message.startswith("bad:") and "after 3 attempts" in bad.message and "HTTP 500" in bad.message
    assert mute.stage is Stage.llm and mute.reason is ReasonCode.llm_empty and "mute" in mute.message
    assert len(server.requests_for("bad")) == 3 and len(server.requests_for("mute")) == 3
    assert out[0].id == "ok1" and out[3].id == "ok2"


def test_400_is_not_retried(server):
    server.scripts = {"x": ["400"]}
    [res] = OpenAICompatBackend(_config(server)).generate([_req("x")])
    assert isinstance(res, QuarantineError) and res.reason is ReasonCode.llm_error
    assert "x:" in res.message and "HTTP 400" in res.message and "boom" in res.message
    assert len(server.requests_for("x")) == 1


def test_exact_messages_and_payload_reach_server(server):
    backend = OpenAICompatBackend(_config(server))
    out = backend.generate([_req("s1", system="You are helpful."), _req("s2", seed=99)])
    assert all(isinstance(r, LLMResult) for r in out)
    [s1] = server.requests_for("s1")
    [s2] = server.requests_for("s2")
    seed_text = "[00:00-00:03] the food is really good (Gender: Female) clip=s1"
    assert s1.body["messages"] == [{"role": "system", "content": "You are helpful."},
                                   {"role": "user", "content": seed_text + "\n" + INSTRUCTION}]
    assert [m["role"] for m in s2.body["messages"]] == ["user"]
    assert {k: s1.body[k] for k in ("model", "temperature", "top_p", "max_tokens", "seed")} == {
        "model": "llama-test", "temperature": 0.05, "top_p": 0.9, "max_tokens": 64, "seed": 7}
    assert s2.body["seed"] == 99
    assert s1.headers.get("Content-Type") == "application/json"  # FastAPI (vllm serve) parses JSON only


def test_api_key_sent_as_bearer_and_never_in_errors(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.scripts = {"e400": ["400"], "e500": ["500"]}
    backend = OpenAICompatBackend(_config(server, max_retries=1))
    out = backend.generate([_req("fine"), _req("e400"), _req("e500")])
    [fine] = server.requests_for("fine")
    assert fine.headers.get("Authorization") == f"Bearer {SECRET}"
    errors = [r for r in out if isinstance(r, QuarantineError)]
    assert len(errors) == 2
    for err in errors:  # the fake server echoes the Authorization header in its error bodies
        assert "Bearer" in err.message and SECRET not in err.message and SECRET not in str(err)


def test_no_authorization_header_without_key(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    OpenAICompatBackend(_config(server)).generate([_req("n")])
    [seen] = server.requests_for("n")
    assert "Authorization" not in seen.headers


def test_concurrency_bound_respected(server):
    server.ok_delay_s = 0.02
    backend = OpenAICompatBackend(_config(server, concurrency=4))
    out = backend.generate([_req(f"k{i}") for i in range(50)])
    assert [r.id for r in out] == [f"k{i}" for i in range(50)]
    assert all(isinstance(r, LLMResult) for r in out)
    assert len(server.seen) == 50
    assert 2 <= server.max_in_flight <= 4, server.max_in_flight


def test_retry_after_is_honoured_and_capped(server):
    server.scripts = {"ra": ["429ra1", "ok"], "long": ["429ra3600", "ok"]}
    backend = OpenAICompatBackend(_config(server))
    backend.max_retry_after_s = 1.0  # cap for the 3600 s answer; also the wait for "ra"
    t0 = time.monotonic()
    out = backend.generate([_req("ra"), _req("long")])
    elapsed = time.monotonic() - t0
    assert [r.generation.attempts for r in out] == [2, 2]
    first, second = server.requests_for("ra")
    assert second.at - first.at >= 0.9  # waited as told, not the 0.01 s backoff
    assert elapsed < 5  # 3600 s was capped


def test_retry_after_parsing():
    assert _retry_after_seconds("3") == 3.0
    assert _retry_after_seconds("-1") == 0.0
    assert _retry_after_seconds(None) is None and _retry_after_seconds("soon") is None
    assert _retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_timeout_exhausts_retries(server):
    server.scripts = {"slow": ["sleep"]}
    [res] = OpenAICompatBackend(_config(server, max_retries=1, timeout_s=0.3)).generate([_req("slow")])
    assert isinstance(res, QuarantineError) and res.reason is ReasonCode.llm_unavailable
    assert "slow:" in res.message and "after 2 attempts" in res.message and "timed out" in res.message


def test_connection_refused_is_quarantined_not_raised():
    cfg = LLMConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m", max_retries=1,
                    backoff_s=0.0, timeout_s=0.5)
    out = make_backend(cfg).generate([_req("r1"), _req("r2")])
    assert [type(r) for r in out] == [QuarantineError, QuarantineError]
    assert {r.reason for r in out} == {ReasonCode.llm_unavailable}
    assert out[0].message.startswith("r1:") and "connection error" in out[0].message
    assert out[1].message.startswith("r2:")


def test_generate_from_worker_thread_and_inside_running_loop(server):
    backend = make_backend(_config(server))
    assert isinstance(backend, OpenAICompatBackend)
    assert backend.model_info() == {"name": "llama-test", "revision": None}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(backend.generate, [_req(f"t{i}")]) for i in range(2)]
        results = [f.result(timeout=10) for f in futures]
    assert [r[0].text for r in results] == ["Response for t0.", "Response for t1."]

    async def caller():
        return backend.generate([_req("inloop")])

    [res] = asyncio.run(caller())
    assert isinstance(res, LLMResult) and res.id == "inloop"
    assert backend.generate([]) == []


def test_connections_are_bounded_by_concurrency_and_kept_alive(server):
    """A batch opens at most `concurrency` connections and reuses them: a connection per request
    would cost a handshake each (and sockets in TIME_WAIT by the thousand at scale)."""
    server.ok_delay_s = 0.01
    backend = OpenAICompatBackend(_config(server, concurrency=4))
    results = backend.generate([_req(f"k{i}") for i in range(40)])
    assert all(isinstance(r, LLMResult) for r in results)
    assert len(server.seen) == 40
    assert 1 <= server.connections <= 4


def test_proxy_variables_are_honoured_and_no_proxy_exempts(monkeypatch):
    """HTTP(S)_PROXY and NO_PROXY apply to the LLM endpoint as they do for any HTTP client here."""
    from tasks.llm.http import env_proxy

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("http://vllm-0:8000/v1/chat/completions") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,vllm-1")
    assert env_proxy("http://vllm-0:8000/v1/chat/completions") == "http://proxy.internal:3128"
    assert env_proxy("http://vllm-1:8000/v1/chat/completions") is None
    assert env_proxy("https://vllm-0:8000/v1/chat/completions") is None  # no HTTPS_PROXY set


def test_url_without_scheme_is_not_retried_and_says_so():
    """A base URL the client cannot use (no http:// or https://) fails each request at once with a
    message naming the URL problem, instead of retrying it as a connection error."""
    backend = OpenAICompatBackend(LLMConfig(backend="openai", base_url="localhost:8000/v1", model="m",
                                            max_retries=3, backoff_s=5.0))
    t0 = time.monotonic()
    [res] = backend.generate([_req("u")])
    assert isinstance(res, QuarantineError) and "bad endpoint URL" in res.message and "attempt 1" in res.message
    assert time.monotonic() - t0 < 2.0  # no backoff waited
