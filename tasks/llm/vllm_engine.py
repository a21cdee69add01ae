"""In-process vLLM engine (`vllm.LLM`): the fastest way to run the LLM stage on the GPUs of one machine.

`vllm` is imported lazily (it is in the `gpu` extra and needs CUDA); importing this module costs
nothing. The engine is built once per process and cached by its settings:
`LLM(model=llm.model, revision=llm.revision, tokenizer=llm.tokenizer, max_model_len=llm.max_model_len,
tensor_parallel_size=llm.tensor_parallel_size, seed=llm.seed)`. Threads of one process share it;
calls into it are serialised by a lock (vLLM batches internally, so a whole `generate` batch is one call).

Each request gets its own `SamplingParams(temperature, top_p, max_tokens, seed=request seed)`, so a
request's answer is reproducible and does not depend on its batch neighbours.
- `prompt_format: chat` → `LLM.chat(conversations, sampling_params)`: vLLM renders the model's own
  chat template with the generation prompt.
- `prompt_format: completion` → `LLM.generate(token prompts, sampling_params)`: the prompt is
  rendered here with `chat_template.render_prompt` (the `llm.tokenizer` directory, else the engine's
  tokenizer) and tokenized without adding special tokens again; this is the same text the
  OpenAI-compatible backend sends to `/completions`.

finish_reason is vLLM's ("stop" / "length"); token counts are the prompt's and the answer's ids.

Data parallelism (`llm.data_parallel_size`): one `vllm.LLM` serves one replica of
`tensor_parallel_size` GPUs; vLLM does not run several replicas inside one process (recent versions
refuse `LLM(data_parallel_size=N)`). Run N replicas as N workers instead, each process seeing its own
GPUs (`CUDA_VISIBLE_DEVICES`) and taking its own shards, e.g. a Prefect process work pool with N
workers, or vLLM's offline data-parallel launch (VLLM_DP_RANK / VLLM_DP_SIZE / VLLM_DP_MASTER_IP /
VLLM_DP_MASTER_PORT per process). Or serve once with `vllm serve MODEL --data-parallel-size N` and
use `llm.backend: openai`, which spreads requests over `llm.base_urls`. The setting is recorded in
the run's config; this backend itself never passes it to `vllm.LLM`.

A failing batch is re-run request by request; a request that still fails, is aborted or comes back
empty becomes a QuarantineError naming the clip id.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from schemas.config import LLMConfig
from schemas.records import Generation, QuarantineError, ReasonCode, Stage
from tasks.llm.base import LLMBackend, LLMRequest, LLMResult, LocalLLMUnavailable, OnResult, reported
from tasks.llm.chat_template import apply_template, check_tokenizer, message_dicts, render_prompt

log = logging.getLogger(__name__)

__all__ = ["VLLMEngineBackend", "require_vllm"]

GPU_EXTRA_HINT = "llm.backend 'vllm' needs the gpu extra (pip install 'speechpairs[gpu]') and a CUDA GPU"

_engine_lock = threading.Lock()
_engines: dict[tuple[Any, ...], tuple[Any, threading.Lock]] = {}


def require_vllm() -> None:
    """Raise LocalLLMUnavailable (with the install hint) unless vllm is importable and CUDA is there."""
    if importlib.util.find_spec("vllm") is None:
        raise LocalLLMUnavailable(f"{GPU_EXTRA_HINT}: the vllm package is not installed")
    try:
        import torch
    except ImportError:
        raise LocalLLMUnavailable(f"{GPU_EXTRA_HINT}: torch is not installed") from None
    if not torch.cuda.is_available():
        raise LocalLLMUnavailable(f"{GPU_EXTRA_HINT}: torch sees no CUDA GPU on this machine (use "
                                  "llm.backend 'transformers' on CPU, or 'openai' against `vllm serve`)")


class VLLMEngineBackend(LLMBackend):
    """`vllm.LLM` in this process; see the module docstring."""

    name = "vllm"
    config: LLMConfig

    def __init__(self, config: LLMConfig) -> None:
        if not config.model:
            raise ValueError("llm.backend 'vllm' needs llm.model (a model id or local path)")
        self.config = config

    # -- public API -------------------------------------------------------------------------------

    def model_info(self) -> dict[str, str | None]:
        return {"name": self.config.model, "revision": self.config.revision}

    def preflight(self) -> None:
        """vllm installed, CUDA present, enough GPUs, and the engine builds (the model loads)."""
        cfg = self.config
        if cfg.device == "cpu":
            raise LocalLLMUnavailable("llm.device 'cpu' does not work with llm.backend 'vllm' (a GPU "
                                      "engine); use llm.backend 'transformers' for CPU generation")
        require_vllm()
        import torch

        gpus = torch.cuda.device_count()
        if gpus < cfg.tensor_parallel_size:
            raise LocalLLMUnavailable(f"llm.tensor_parallel_size {cfg.tensor_parallel_size} needs that many "
                                      f"GPUs; this process sees {gpus}")
        if cfg.data_parallel_size > 1:
            log.warning("llm.data_parallel_size=%d: this process runs ONE vLLM replica on %d GPU(s); run %d "
                        "workers with their own CUDA_VISIBLE_DEVICES (or `vllm serve --data-parallel-size` "
                        "with backend 'openai') for data parallelism", cfg.data_parallel_size,
                        cfg.tensor_parallel_size, cfg.data_parallel_size)
        if cfg.prompt_format == "completion" and cfg.tokenizer:
            check_tokenizer(cfg.tokenizer)
        self._engine()

    def close(self) -> None:
        """Nothing to release: the engine stays cached for the next shard of this process."""

    def render(self, request: LLMRequest) -> str:
        """The exact prompt text the engine is given for `request` (the model's chat template)."""
        llm, lock = self._engine()
        return self._render(llm, lock, request)

    def generate(self, requests: Sequence[LLMRequest],
                 on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        requests = list(requests)
        if not requests:
            return []
        llm, lock = self._engine()  # an engine that cannot start fails the shard (preflight catches it first)
        try:
            return reported(self._run(llm, lock, requests, attempt=1), on_result)
        except Exception as exc:  # noqa: BLE001 - find the culprit: retry one by one
            if len(requests) == 1:
                return reported([self._failed(requests[0], exc)], on_result)
            log.warning("vLLM batch of %d failed (%s: %s); retrying one by one", len(requests),
                        type(exc).__name__, exc)
        results: list[LLMResult | QuarantineError] = []
        for req in requests:
            try:
                results.extend(self._run(llm, lock, [req], attempt=2))
            except Exception as exc:  # noqa: BLE001 - one bad request must not sink the batch
                results.append(self._failed(req, exc))
        return reported(results, on_result)

    # -- internals --------------------------------------------------------------------------------

    def _engine(self) -> tuple[Any, threading.Lock]:
        cfg = self.config
        key = (cfg.model, cfg.revision, cfg.tokenizer, cfg.max_model_len, cfg.tensor_parallel_size, cfg.seed)
        with _engine_lock:
            cached = _engines.get(key)
            if cached is not None:
                return cached
            try:
                from vllm import LLM
            except ImportError as exc:
                raise LocalLLMUnavailable(f"{GPU_EXTRA_HINT}: {exc}") from None
            kwargs: dict[str, Any] = {"model": cfg.model, "revision": cfg.revision, "seed": cfg.seed,
                                      "tensor_parallel_size": cfg.tensor_parallel_size}
            if cfg.tokenizer:
                kwargs["tokenizer"] = cfg.tokenizer
            if cfg.max_model_len:
                kwargs["max_model_len"] = cfg.max_model_len
            try:
                llm = LLM(**kwargs)
            except Exception as exc:  # noqa: BLE001 - missing weights, out of memory, bad max_model_len, …
                raise LocalLLMUnavailable(f"llm.model: vLLM cannot load {cfg.model!r}"
                                          f"{f' at revision {cfg.revision!r}' if cfg.revision else ''}: "
                                          f"{type(exc).__name__}: {exc}") from None
            cached = _engines[key] = (llm, threading.Lock())
            return cached

    def _sampling(self, req: LLMRequest) -> Any:
        from vllm import SamplingParams

        cfg = self.config
        return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                              seed=req.seed)

    def _render(self, llm: Any, lock: threading.Lock, req: LLMRequest) -> str:
        if self.config.tokenizer:
            return render_prompt(req.messages, self.config.tokenizer)
        with lock:
            tokenizer = llm.get_tokenizer()
        return apply_template(tokenizer, req.messages, setting="llm.model")

    def _run(self, llm: Any, lock: threading.Lock, requests: list[LLMRequest],
             attempt: int) -> list[LLMResult | QuarantineError]:
        params = [self._sampling(r) for r in requests]
        if self.config.prompt_format == "completion":
            texts = [self._render(llm, lock, r) for r in requests]
            with lock:
                tokenizer = llm.get_tokenizer()
                prompts = [{"prompt_token_ids": list(tokenizer(t, add_special_tokens=False)["input_ids"])}
                           for t in texts]
                started = time.perf_counter()
                outputs = llm.generate(prompts, sampling_params=params, use_tqdm=False)
        else:
            conversations = [message_dicts(r.messages) for r in requests]
            with lock:
                started = time.perf_counter()
                outputs = llm.chat(conversations, sampling_params=params, use_tqdm=False,
                                   add_generation_prompt=True)
        latency = time.perf_counter() - started
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        return [self._result(req, out, attempt, latency) for req, out in zip(requests, outputs, strict=True)]

    def _result(self, req: LLMRequest, out: Any, attempt: int, latency: float) -> LLMResult | QuarantineError:
        cfg = self.config
        if not out.outputs:
            return QuarantineError(Stage.llm, ReasonCode.llm_error, f"{req.id}: vLLM returned no completion")
        choice = out.outputs[0]
        finish = choice.finish_reason
        if finish == "abort":
            return QuarantineError(Stage.llm, ReasonCode.llm_error, f"{req.id}: vLLM aborted the request")
        completion = len(choice.token_ids or [])
        text = (choice.text or "").strip()
        if not text:
            return QuarantineError(Stage.llm, ReasonCode.llm_empty, f"{req.id}: the model produced no text "
                                   f"(finish_reason={finish}, {completion} tokens)")
        prompt_ids = out.prompt_token_ids
        gen = Generation(backend=self.name, model=cfg.model, revision=cfg.revision,
                         temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                         seed=req.seed,
                         finish_reason=str(finish) if finish is not None else None,
                         prompt_tokens=len(prompt_ids) if prompt_ids is not None else None,
                         completion_tokens=completion, attempts=attempt, latency_s=round(latency, 6))
        return LLMResult(id=req.id, text=text, generation=gen)

    @staticmethod
    def _failed(req: LLMRequest, exc: BaseException) -> QuarantineError:
        return QuarantineError(Stage.llm, ReasonCode.llm_error,
                               f"{req.id}: vLLM generation failed: {type(exc).__name__}: {exc}")
