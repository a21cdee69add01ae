"""Local LLM backends: in-process transformers (a tiny random Llama built here), the chat-template
completion mode (rendered locally, sent to /completions on 127.0.0.1), and the vLLM engine (a fake
`vllm` module here; the real engine in `gpu` tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from schemas.config import LLMConfig
from schemas.records import Message, QuarantineError, ReasonCode, Stage
from tasks.llm import (
    LLMRequest,
    LLMResult,
    build_messages,
    chat_template,
    make_backend,
    transformers_backend,
    vllm_engine,
)
from tasks.llm.base import LocalLLMUnavailable
from tasks.llm.chat_template import FALLBACK_CHAT_TEMPLATE, render_prompt
from tasks.llm.openai_compat import LLMUnavailable, OpenAICompatBackend
from tasks.llm.transformers_backend import TransformersBackend
from tasks.llm.vllm_engine import VLLMEngineBackend
from tests.support.tiny_models import build_tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm") / "model")


@pytest.fixture(scope="module")
def tiny_base_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of model whose tokenizer has no chat template (a base model)."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_base") / "model", seed=1, chat_template=None)


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    yield
    transformers_backend.clear_cache()
    chat_template.clear_cache()


def _req(i: int | str, seed: int = 0, text: str | None = None) -> LLMRequest:
    seed_text = text or f"[00:00-00:03] The food is number {i} (Gender: Female, Emotion: Happy)"
    return LLMRequest(id=f"clip-{i}", messages=build_messages(seed_text, "What can you hear from the audio?"),
                      seed=seed, duration_s=3.0)


def _tf(model: Path, **kw: Any) -> TransformersBackend:
    settings: dict[str, Any] = {"backend": "transformers", "model": str(model), "device": "cpu",
                                "temperature": 1.0, "max_tokens": 12, **kw}
    return TransformersBackend(LLMConfig(**settings))


def _ok(results: list[LLMResult | QuarantineError]) -> list[LLMResult]:
    assert all(isinstance(r, LLMResult) for r in results), results
    return results  # type: ignore[return-value]


# -- chat template -----------------------------------------------------------------------------


def test_render_prompt_is_the_tokenizers_own_template(tiny_lm: Path) -> None:
    messages = [Message(role="system", content="Be brief."),
                Message(role="user", content="[00:00-00:03] hi (Gender: Male)\nWhat can you hear?")]
    expected = ("<|bos|><|system|>\nBe brief.<|end|>\n"
                "<|user|>\n[00:00-00:03] hi (Gender: Male)\nWhat can you hear?<|end|>\n<|assistant|>\n")
    assert render_prompt(messages, str(tiny_lm)) == expected
    assert render_prompt([m.model_dump() for m in messages], str(tiny_lm)) == expected  # dicts work too


def test_render_prompt_errors_name_llm_tokenizer(tmp_path: Path, tiny_base_lm: Path) -> None:
    msgs = [Message(role="user", content="hi")]
    with pytest.raises(ValueError, match="llm.tokenizer is not set"):
        render_prompt(msgs, None)
    with pytest.raises(ValueError, match="llm.tokenizer: no tokenizer directory"):
        render_prompt(msgs, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="llm.tokenizer: cannot load a tokenizer"):
        render_prompt(msgs, str(tmp_path))  # a directory without tokenizer files
    with pytest.raises(LLMUnavailable, match=r"llm.tokenizer: .* has no chat template"):
        render_prompt(msgs, str(tiny_base_lm))


# -- transformers backend --------------------------------------------------------------------------


def test_make_backend_dispatches_without_loading(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    tf = make_backend(LLMConfig(backend="transformers", model=missing))
    assert isinstance(tf, TransformersBackend) and tf.model_info() == {"name": missing, "revision": None}
    vl = make_backend(LLMConfig(backend="vllm", model="org/model", revision="abc123"))
    assert isinstance(vl, VLLMEngineBackend)
    assert vl.model_info() == {"name": "org/model", "revision": "abc123"}


def test_transformers_generates_real_tokens_in_order(tiny_lm: Path) -> None:
    backend = _tf(tiny_lm, max_tokens=6)
    backend.preflight()
    requests = [_req(i, seed=i) for i in range(5)]
    results = _ok(backend.generate(requests))
    assert [r.id for r in results] == [r.id for r in requests]
    assert sum(bool(r.text.strip()) for r in results) >= 4
    tok = chat_template.load_tokenizer(str(tiny_lm))
    for req, res in zip(requests, results, strict=True):
        gen = res.generation
        assert (gen.backend, gen.model, gen.seed, gen.temperature, gen.max_tokens) == \
            ("transformers", str(tiny_lm), req.seed, 1.0, 6)
        assert gen.finish_reason == "length" and gen.completion_tokens == 6
        prompt = render_prompt(req.messages, str(tiny_lm))
        assert gen.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert backend.render(req) == prompt


def test_transformers_sampling_is_seeded_per_request(tiny_lm: Path) -> None:
    backend = _tf(tiny_lm, max_tokens=16)
    batch = [_req("a", seed=7), _req("b", seed=8), _req("a", seed=7), _req("a", seed=9)]
    a7, _b8, a7_again, a9 = (r.text for r in _ok(backend.generate(batch)))
    assert a7 == a7_again  # same request, same seed → same text
    assert a7 != a9  # another seed → another sample
    assert a7 == _ok(backend.generate([_req("a", seed=7)]))[0].text  # alone, not batched: same text
    assert a7 == _ok(_tf(tiny_lm, max_tokens=16).generate([_req("x"), _req("a", seed=7)]))[1].text


def test_transformers_greedy_ignores_the_seed(tiny_lm: Path) -> None:
    backend = _tf(tiny_lm, temperature=0.0)
    texts = {r.text for r in _ok(backend.generate([_req("g", seed=s) for s in range(3)]))}
    assert len(texts) == 1


def test_transformers_tiny_top_p_keeps_only_the_top_token(tiny_lm: Path) -> None:
    requests = [_req(i, seed=i) for i in range(3)]
    greedy = [r.text for r in _ok(_tf(tiny_lm, temperature=0.0).generate(requests))]
    assert [r.text for r in _ok(_tf(tiny_lm, temperature=1.5, top_p=0.01).generate(requests))] == greedy
    assert [r.text for r in _ok(_tf(tiny_lm, temperature=1.5).generate(requests))] != greedy


def test_transformers_finish_reason_stop_at_eos(tiny_lm: Path, tmp_path: Path) -> None:
    """Make a token the greedy answer produces an EOS: generation stops there with 'stop'."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    req = _req("eos")
    tok = chat_template.load_tokenizer(str(tiny_lm))
    ids = tok(render_prompt(req.messages, str(tiny_lm)), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    k = next(k for k in range(1, len(greedy)) if greedy[k] not in greedy[:k])  # first token not seen before
    copy = Path(shutil.copytree(tiny_lm, tmp_path / "eos_model"))
    gen_config = json.loads((copy / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [gen_config["eos_token_id"], greedy[k]]
    (copy / "generation_config.json").write_text(json.dumps(gen_config))

    res = _ok(_tf(copy, temperature=0.0, max_tokens=12).generate([req]))[0]
    assert res.generation.finish_reason == "stop"
    assert res.generation.completion_tokens == k + 1  # the answer plus the EOS
    assert res.text == tok.decode(greedy[:k], skip_special_tokens=True).strip()


def test_transformers_falls_back_to_a_minimal_template(tiny_base_lm: Path) -> None:
    backend = _tf(tiny_base_lm, max_tokens=4)
    req = _req(1)
    content = req.messages[0].content
    assert backend.render(req) == f"<|user|>\n{content}\n<|assistant|>\n"
    tok = chat_template.load_tokenizer(str(tiny_base_lm))
    assert tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   chat_template=FALLBACK_CHAT_TEMPLATE,
                                   add_generation_prompt=True) == backend.render(req)
    assert _ok(backend.generate([req]))[0].generation.completion_tokens == 4


def test_transformers_preflight_names_llm_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="llm.model: no such directory"):
        _tf(tmp_path / "nowhere" / "model").preflight()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMUnavailable, match="llm.model: cannot load"):  # the CLI reports it as a usage error
        _tf(tmp_path / "empty").preflight()


def test_transformers_quarantines_one_request_not_the_batch(tiny_lm: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _tf(tiny_lm, max_tokens=3)
    real_run = backend._run
    calls: list[list[str]] = []

    def flaky_run(loaded: Any, batch: list[Any], attempt: int) -> Any:
        ids = [p.request.id for p in batch]
        calls.append(ids)
        if "clip-bad" in ids:
            raise RuntimeError("CUDA error: device-side assert")
        return real_run(loaded, batch, attempt)

    monkeypatch.setattr(backend, "_run", flaky_run)
    long = "a very long seed " * 200  # does not fit the 512-token context with the answer
    results = backend.generate([_req(0), _req("bad"), _req("long", text=long), _req(3)])
    assert isinstance(results[0], LLMResult) and isinstance(results[3], LLMResult)
    assert results[0].generation.attempts == 2  # its batch failed; it succeeded alone
    bad, too_long = results[1], results[2]
    assert isinstance(bad, QuarantineError) and bad.stage is Stage.llm and bad.reason is ReasonCode.llm_error
    assert bad.message.startswith("clip-bad: ") and "device-side assert" in bad.message
    assert isinstance(too_long, QuarantineError) and too_long.message.startswith("clip-long: ")
    assert "exceeds the model's context of 512 tokens" in too_long.message
    assert len(calls[0]) == 3 and sorted(calls[1:]) == [["clip-0"], ["clip-3"], ["clip-bad"]]


# -- completion mode over HTTP ---------------------------------------------------------------------


@dataclass
class _Completions:
    """A tiny OpenAI-compatible /v1/completions server on 127.0.0.1 that records what it gets."""

    bodies: list[tuple[str, dict[str, Any]]]
    httpd: ThreadingHTTPServer

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"


@pytest.fixture()
def completions_server() -> Iterator[_Completions]:
    bodies: list[tuple[str, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"data": [{"id": "tiny"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            bodies.append((self.path, body))
            if self.path != "/v1/completions":
                self._send(404, {"error": "not found"})
                return
            text = f" answer {len(bodies)}"
            self._send(200, {"object": "text_completion", "model": "tiny",
                             "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 11, "completion_tokens": 2}})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield _Completions(bodies, httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_openai_completion_mode_sends_the_rendered_prompt(tiny_lm: Path,
                                                          completions_server: _Completions) -> None:
    config = LLMConfig(backend="openai", base_url=completions_server.base_url, model="tiny",
                       prompt_format="completion", tokenizer=str(tiny_lm), max_retries=0)
    backend = OpenAICompatBackend(config)
    backend.preflight()
    requests = [_req(1, seed=5), _req(2, seed=6)]
    results = _ok(backend.generate(requests))
    assert [r.text for r in results] != [] and all(r.text.startswith("answer") for r in results)
    assert results[0].generation.finish_reason == "length" and results[0].generation.completion_tokens == 2
    seen = {body["seed"]: (path, body) for path, body in completions_server.bodies}
    for req in requests:
        path, body = seen[req.seed]
        assert path == "/v1/completions"
        assert body["prompt"] == render_prompt(req.messages, str(tiny_lm))
        assert body["prompt"].startswith("<|bos|><|user|>\n")
        assert "messages" not in body
        assert body["add_special_tokens"] is False  # the template already placed BOS
        assert (body["model"], body["max_tokens"]) == ("tiny", config.max_tokens)


def test_openai_completion_mode_preflight_checks_the_tokenizer(tiny_base_lm: Path) -> None:
    config = LLMConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="tiny",
                       prompt_format="completion", tokenizer=str(tiny_base_lm))
    with pytest.raises(LLMUnavailable, match="llm.tokenizer: .*no chat template"):
        OpenAICompatBackend(config).preflight()  # fails before any network call


# -- vLLM engine -----------------------------------------------------------------------------------


def test_vllm_preflight_without_vllm_says_install_the_gpu_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else importlib.util.find_spec(name, *a))
    backend = make_backend(LLMConfig(backend="vllm", model="org/model"))
    with pytest.raises(LocalLLMUnavailable, match=r"llm.backend 'vllm' needs the gpu extra .*not installed"):
        backend.preflight()
    with pytest.raises(ValueError, match="llm.device 'cpu' does not work with llm.backend 'vllm'"):
        make_backend(LLMConfig(backend="vllm", model="org/model", device="cpu")).preflight()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_really_missing_here() -> None:
    with pytest.raises(LLMUnavailable, match="needs the gpu extra"):
        VLLMEngineBackend(LLMConfig(backend="vllm", model="org/model")).generate([_req(0)])


class _FakeOutput:
    def __init__(self, text: str, token_ids: list[int], finish_reason: str) -> None:
        self.text, self.token_ids, self.finish_reason = text, token_ids, finish_reason


class _FakeRequestOutput:
    def __init__(self, prompt_token_ids: list[int], output: _FakeOutput) -> None:
        self.prompt_token_ids, self.outputs = prompt_token_ids, [output]


@pytest.fixture()
def fake_vllm(monkeypatch: pytest.MonkeyPatch, tiny_lm: Path) -> types.SimpleNamespace:
    """A stand-in `vllm` module: records engine kwargs and calls, answers from the request seed."""
    record = types.SimpleNamespace(engines=[], calls=[])
    tokenizer = chat_template.load_tokenizer(str(tiny_lm))

    class SamplingParams:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

    class LLM:
        def __init__(self, **kw: Any) -> None:
            record.engines.append(kw)

        def get_tokenizer(self) -> Any:
            return tokenizer

        def _answer(self, prompt_ids: list[int], params: SamplingParams) -> _FakeRequestOutput:
            seed = params.kw["seed"]
            if seed == 666:
                raise RuntimeError("engine exploded")
            finish = "length" if seed % 2 else "stop"
            text = "" if seed == 404 else f"answer for seed {seed}"
            return _FakeRequestOutput(prompt_ids, _FakeOutput(text, [1, 2, 3], finish))

        def chat(self, messages: list[list[dict[str, str]]], sampling_params: list[SamplingParams],
                 **kw: Any) -> list[_FakeRequestOutput]:
            record.calls.append(("chat", messages, sampling_params, kw))
            return [self._answer([0] * len(m), p) for m, p in zip(messages, sampling_params, strict=True)]

        def generate(self, prompts: list[dict[str, list[int]]], sampling_params: list[SamplingParams],
                     **kw: Any) -> list[_FakeRequestOutput]:
            record.calls.append(("generate", prompts, sampling_params, kw))
            return [self._answer(p["prompt_token_ids"], s)
                    for p, s in zip(prompts, sampling_params, strict=True)]

    module = types.ModuleType("vllm")
    module.LLM = LLM  # type: ignore[attr-defined]
    module.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_engine, "_engines", {})
    return record


def test_vllm_engine_chat_maps_outputs(fake_vllm: types.SimpleNamespace) -> None:
    config = LLMConfig(backend="vllm", model="org/m", revision="r1", max_model_len=4096,
                       tensor_parallel_size=2, data_parallel_size=2, seed=3, temperature=0.7, top_p=0.9,
                       max_tokens=50)
    backend = VLLMEngineBackend(config)
    results = backend.generate([_req(0, seed=10), _req(1, seed=11), _req(2, seed=404)])
    VLLMEngineBackend(config).generate([_req(3, seed=12)])  # same settings: the engine is built once
    assert fake_vllm.engines == [{"model": "org/m", "revision": "r1", "seed": 3, "tensor_parallel_size": 2,
                                  "max_model_len": 4096}]
    kind, conversations, params, kw = fake_vllm.calls[0]
    assert kind == "chat" and kw["add_generation_prompt"] is True
    assert conversations[0] == [m.model_dump() for m in _req(0).messages]
    assert [p.kw for p in params][:2] == [{"temperature": 0.7, "top_p": 0.9, "max_tokens": 50, "seed": 10},
                                          {"temperature": 0.7, "top_p": 0.9, "max_tokens": 50, "seed": 11}]
    first, second, empty = results
    assert isinstance(first, LLMResult) and isinstance(second, LLMResult)
    assert (first.text, first.generation.finish_reason, second.generation.finish_reason) == \
        ("answer for seed 10", "stop", "length")
    gen = first.generation
    assert (gen.backend, gen.model, gen.revision) == ("vllm", "org/m", "r1")
    assert first.generation.completion_tokens == 3 and first.generation.prompt_tokens == 1
    assert isinstance(empty, QuarantineError) and empty.reason is ReasonCode.llm_empty
    assert empty.message.startswith("clip-2: ")


def test_vllm_engine_completion_mode_and_per_request_fallback(fake_vllm: types.SimpleNamespace,
                                                              tiny_lm: Path) -> None:
    config = LLMConfig(backend="vllm", model="org/m", prompt_format="completion", tokenizer=str(tiny_lm))
    backend = VLLMEngineBackend(config)
    requests = [_req(0, seed=2), _req(1, seed=666), _req(2, seed=4)]
    results = backend.generate(requests)
    assert fake_vllm.engines[0]["tokenizer"] == str(tiny_lm)
    kind, prompts, _, _ = fake_vllm.calls[0]
    tok = chat_template.load_tokenizer(str(tiny_lm))
    expected = tok(render_prompt(requests[0].messages, str(tiny_lm)), add_special_tokens=False)["input_ids"]
    assert kind == "generate" and prompts[0]["prompt_token_ids"] == expected
    assert expected.count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert backend.render(requests[0]) == render_prompt(requests[0].messages, str(tiny_lm))
    assert len(fake_vllm.calls) == 1 + 3  # the batch failed, then one call per request
    ok0, bad, ok2 = results
    assert isinstance(ok0, LLMResult) and isinstance(ok2, LLMResult) and ok0.generation.attempts == 2
    assert isinstance(bad, QuarantineError) and bad.reason is ReasonCode.llm_error
    assert bad.message.startswith("clip-1: vLLM generation failed") and "engine exploded" in bad.message


# -- GPU (skipped without CUDA) ----------------------------------------------------------------------


@pytest.mark.gpu
def test_transformers_on_cuda_matches_the_contract(tiny_lm: Path) -> None:
    backend = _tf(tiny_lm, device="cuda", max_tokens=8)
    results = _ok(backend.generate([_req(i, seed=i) for i in range(4)]))
    assert all(r.generation.completion_tokens for r in results)
    again = _ok(_tf(tiny_lm, device="cuda", max_tokens=8).generate([_req(2, seed=2)]))[0]
    assert again.text == results[2].text


@pytest.mark.gpu
def test_vllm_engine_on_gpu(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    model = build_tiny_causal_lm(tmp_path / "model", hidden_size=256, num_heads=4)
    for fmt in ("chat", "completion"):
        config = LLMConfig(backend="vllm", model=str(model), prompt_format=fmt,  # type: ignore[arg-type]
                           tokenizer=str(model), max_model_len=512, temperature=1.0, max_tokens=8)
        backend = VLLMEngineBackend(config)
        backend.preflight()
        results = backend.generate([_req(i, seed=i) for i in range(4)] + [_req(0, seed=0)])
        ok = [r for r in results if isinstance(r, LLMResult)]
        assert len(ok) >= 4 and all(r.generation.completion_tokens for r in ok)
        assert all(r.generation.finish_reason in ("stop", "length") for r in ok)
        assert isinstance(results[0], LLMResult) and isinstance(results[4], LLMResult)
        assert results[0].text == results[4].text  # same seed, same text
