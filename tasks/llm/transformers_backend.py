"""In-process `transformers` generation: small causal LMs on CPU (or one GPU), no server.

The model (`AutoModelForCausalLM`) and tokenizer come from `llm.model`, a Hugging Face id or a
local directory, at `llm.revision`; a local directory, or `HF_HUB_OFFLINE=1`, loads with
`local_files_only` (nothing downloads). `llm.tokenizer`, when set, is used instead of the model's
own tokenizer. Loading happens on first use (`preflight` or `generate`), once per process for a
given (model, revision, tokenizer, device): threads working on different shards share it, and
generation on it is serialised by a lock. Float32 on CPU; the checkpoint's dtype on CUDA.

Prompts: the tokenizer's chat template with the generation prompt (`prompt_format` makes no
difference here: the text is always rendered locally); a tokenizer without one gets the
documented `chat_template.FALLBACK_CHAT_TEMPLATE`. The rendered text is tokenized without adding
special tokens again (the template places them).

Batches: up to `llm.concurrency` requests per `generate` call on the model, sorted by prompt length,
left-padded (a missing pad token falls back to EOS). Results come back in request order.

Sampling: `temperature == 0` is greedy. `temperature > 0` samples from softmax(logits / temperature)
restricted to the nucleus `top_p`, with one `torch.Generator` per request seeded by the request's
seed. Drawing is done by a logits processor, so a request's tokens depend only on its own seed and
its own logits: the same request gives the same text whatever batch it lands in (up to
floating-point noise from padding). Model defaults such as `repetition_penalty` in its
generation_config still apply (as in vLLM); its default temperature/top_p/top_k do not.

`finish_reason` is "stop" when an EOS token ended the answer, "length" when `llm.max_tokens` did.
`completion_tokens` counts the generated tokens up to and including the EOS.

A failing batch is re-run request by request; a request that still fails, does not fit the
context (`llm.max_model_len`, else the model's `max_position_embeddings`) or decodes to nothing
becomes a QuarantineError naming the clip id.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import LLMConfig
from schemas.records import Generation, QuarantineError, ReasonCode, Stage
from tasks.llm.base import LLMBackend, LLMRequest, LLMResult, LocalLLMUnavailable, OnResult, reported
from tasks.llm.chat_template import apply_template

log = logging.getLogger(__name__)

__all__ = ["TransformersBackend", "clear_cache"]


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    device: str
    eos_ids: list[int]
    context: int | None  # most tokens (prompt + answer) the model takes; None = unknown
    has_template: bool
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str | None, str | None, str], _Loaded] = {}


def clear_cache() -> None:
    """Drop every loaded model of this process (tests; freeing memory between runs)."""
    with _cache_lock:
        _cache.clear()


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else naming a file system location is a path."""
    return (name.startswith(("/", "./", "../", "~", "\\")) or name.count("/") > 1 or "\\" in name
            or (len(name) > 1 and name[1] == ":"))


def _resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise LocalLLMUnavailable("llm.device: 'cuda' requested but torch sees no CUDA GPU; "
                                  "use 'auto' or 'cpu'")
    return setting


def _source(name: str, setting: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local directory)."""
    name = name.strip()
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local), True
    if local.exists():
        raise LocalLLMUnavailable(f"{setting}: {name!r} is a file; give the directory holding config.json "
                                  "and the weights (as written by save_pretrained)")
    if _looks_like_path(name):
        raise LocalLLMUnavailable(f"{setting}: no such directory {name!r}; fix the path, or give a "
                                  "Hugging Face model id (org/name)")
    return name, False


def _load(config: LLMConfig) -> _Loaded:
    if not config.model or not config.model.strip():
        raise LocalLLMUnavailable("llm.model is not set: backend 'transformers' needs a model id "
                                  "or a local directory")
    device = _resolve_device(config.device)
    key = (config.model.strip(), config.revision, config.tokenizer, device)
    with _cache_lock:
        loaded = _cache.get(key)
        if loaded is None:
            loaded = _cache[key] = _load_uncached(config, device)
        return loaded


def _load_uncached(config: LLMConfig, device: str) -> _Loaded:
    assert config.model is not None
    model_src, model_local = _source(config.model, "llm.model")
    tok_setting = "llm.tokenizer" if config.tokenizer else "llm.model"
    tok_src, tok_local = (_source(config.tokenizer, "llm.tokenizer") if config.tokenizer
                          else (model_src, model_local))
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise LocalLLMUnavailable(f"llm.backend 'transformers' needs the `models` extra "
                                  f"(pip install 'speechpairs[models]'): {exc}") from None
    hf_logging.disable_progress_bar()

    def where(name: str, local: bool) -> str:
        if local:
            return "this directory"
        return ("the Hugging Face cache (offline runs cannot download: fetch it once with "
                f"`huggingface-cli download {name}` where there is network, or give a local directory)")

    revision = f" at revision {config.revision!r}" if config.revision else ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_src, revision=config.revision,
                                                  local_files_only=tok_local or _offline())
    except Exception as exc:  # noqa: BLE001 - OSError offline / missing files, ValueError, …
        raise LocalLLMUnavailable(f"{tok_setting}: cannot load a tokenizer {tok_src!r}{revision} from "
                                  f"{where(tok_src, tok_local)}: {type(exc).__name__}: {exc}") from None
    model: Any
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_src, revision=config.revision, local_files_only=model_local or _offline(),
            dtype=torch.float32 if device == "cpu" else "auto")
    except Exception as exc:  # noqa: BLE001 - OSError (offline, files missing), ValueError (not a causal LM)
        raise LocalLLMUnavailable(f"llm.model: cannot load {config.model!r}{revision} as a causal LM from "
                                  f"{where(model_src, model_local)}: {type(exc).__name__}: {exc}") from None
    model.to(device)
    model.eval()

    tokenizer.padding_side = "left"  # decoder-only: the answer continues right after each prompt
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise LocalLLMUnavailable(f"{tok_setting}: tokenizer {tok_src!r} has neither a pad "
                                      "nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token

    gen_defaults = copy.deepcopy(model.generation_config)
    eos = gen_defaults.eos_token_id if gen_defaults.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    # Our own settings replace the checkpoint's sampling defaults (they would otherwise be merged in).
    gen_defaults.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None,
                        max_length=None, max_new_tokens=None, num_beams=1)
    model.generation_config = gen_defaults

    context = config.max_model_len or getattr(model.config, "max_position_embeddings", None) \
        or getattr(model.config, "n_positions", None)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        log.warning("tokenizer %r has no chat template: prompts use the fallback template "
                    "(tasks.llm.chat_template.FALLBACK_CHAT_TEMPLATE)", tok_src)
    return _Loaded(model=model, tokenizer=tokenizer, device=device, eos_ids=eos_ids,
                   context=int(context) if context else None, has_template=has_template)


def _seeded_sampler(seeds: Sequence[int], temperature: float, top_p: float, device: str) -> Any:
    """A logits processor that draws each row's next token with that row's own generator.

    It returns scores that are -inf everywhere but at the drawn token, so greedy selection in
    `generate` picks exactly the drawn token.
    """
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.generators = [torch.Generator(device=device).manual_seed(int(s) % (2 ** 63)) for s in seeds]

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            probs = torch.softmax(scores.float() / temperature, dim=-1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                # Keep tokens while the mass before them is below top_p (the top token is always kept).
                sorted_p = sorted_p.masked_fill((sorted_p.cumsum(dim=-1) - sorted_p) >= top_p, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            chosen = torch.stack([torch.multinomial(probs[i], 1, generator=g)
                                  for i, g in enumerate(self.generators)])
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(1, chosen, 0.0)

    return SeededSampler()


@dataclass
class _Prepared:
    index: int
    request: LLMRequest
    ids: list[int]


class TransformersBackend(LLMBackend):
    """`AutoModelForCausalLM.generate` in this process; see the module docstring."""

    name = "transformers"
    config: LLMConfig

    def __init__(self, config: LLMConfig) -> None:
        if not config.model:
            raise ValueError("llm.backend 'transformers' needs llm.model (a model id or local path)")
        self.config = config
        self.batch_size = config.concurrency

    # -- public API -------------------------------------------------------------------------------

    def model_info(self) -> dict[str, str | None]:
        return {"name": self.config.model, "revision": self.config.revision}

    def preflight(self) -> None:
        """Load the model and tokenizer now: a bad llm.model fails the run before any clip."""
        _load(self.config)

    def close(self) -> None:
        """Nothing to release: the loaded model stays cached for the next shard of this process."""

    def render(self, request: LLMRequest) -> str:
        """The exact prompt text the model is given for `request` (its tokenizer's chat template)."""
        loaded = _load(self.config)
        return apply_template(loaded.tokenizer, request.messages, fallback=True)

    def generate(self, requests: Sequence[LLMRequest],
                 on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        requests = list(requests)
        if not requests:
            return []
        loaded = _load(self.config)  # a model that cannot load fails the shard (preflight catches it first)
        out: list[LLMResult | QuarantineError | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for i, req in enumerate(requests):
            try:
                prepared.append(_Prepared(i, req, self._tokenize(loaded, req)))
            except Exception as exc:  # noqa: BLE001 - one bad request must not sink the batch
                out[i] = QuarantineError(Stage.llm, ReasonCode.llm_error,
                                         f"{req.id}: cannot build the prompt: {type(exc).__name__}: {exc}")
        prepared.sort(key=lambda p: len(p.ids))  # similar lengths share a batch: less padding
        for start in range(0, len(prepared), self.batch_size):
            batch = prepared[start:start + self.batch_size]
            for p, result in zip(batch, self._run_with_fallback(loaded, batch), strict=True):
                out[p.index] = result
        results = [r for r in out if r is not None]
        assert len(results) == len(requests)
        return reported(results, on_result)

    # -- internals --------------------------------------------------------------------------------

    def _tokenize(self, loaded: _Loaded, req: LLMRequest) -> list[int]:
        text = apply_template(loaded.tokenizer, req.messages, fallback=True)
        with loaded.lock:  # fast tokenizers are not safe to use from several threads at once
            ids = list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError("the rendered prompt has no tokens")
        if loaded.context is not None and len(ids) + self.config.max_tokens > loaded.context:
            raise ValueError(f"prompt of {len(ids)} tokens + llm.max_tokens {self.config.max_tokens} exceeds "
                             f"the model's context of {loaded.context} tokens (llm.max_model_len)")
        return ids

    def _run_with_fallback(self, loaded: _Loaded,
                           batch: list[_Prepared]) -> list[LLMResult | QuarantineError]:
        try:
            return self._run(loaded, batch, attempt=1)
        except Exception as exc:  # noqa: BLE001 - find the culprit: retry one by one
            if len(batch) == 1:
                req = batch[0].request
                return [QuarantineError(Stage.llm, ReasonCode.llm_error, f"{req.id}: transformers "
                                        f"generation failed: {type(exc).__name__}: {exc}")]
            log.warning("transformers batch of %d failed (%s: %s); retrying one by one",
                        len(batch), type(exc).__name__, exc)
        results: list[LLMResult | QuarantineError] = []
        for p in batch:
            try:
                results.extend(self._run(loaded, [p], attempt=2))
            except Exception as exc:  # noqa: BLE001 - one bad request must not sink the batch
                results.append(QuarantineError(Stage.llm, ReasonCode.llm_error,
                                               f"{p.request.id}: transformers generation failed: "
                                               f"{type(exc).__name__}: {exc}"))
        return results

    def _run(self, loaded: _Loaded, batch: list[_Prepared],
             attempt: int) -> list[LLMResult | QuarantineError]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        cfg = self.config
        tok = loaded.tokenizer
        width = max(len(p.ids) for p in batch)
        pad = int(tok.pad_token_id)
        input_ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in batch], dtype=torch.long)
        attention = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch],
                                 dtype=torch.long)
        gen_config = GenerationConfig(max_new_tokens=cfg.max_tokens, do_sample=False, num_beams=1,
                                      pad_token_id=pad, eos_token_id=loaded.eos_ids or None)
        processors = LogitsProcessorList()
        if cfg.temperature > 0:
            processors.append(_seeded_sampler([p.request.seed for p in batch], cfg.temperature, cfg.top_p,
                                              loaded.device))
        with loaded.lock:
            started = time.perf_counter()
            with torch.inference_mode():
                output = loaded.model.generate(input_ids=input_ids.to(loaded.device),
                                               attention_mask=attention.to(loaded.device),
                                               generation_config=gen_config, logits_processor=processors)
            latency = time.perf_counter() - started
            new_tokens = output[:, width:].tolist()
            texts = []
            for row in new_tokens:
                stop = next((k for k, t in enumerate(row) if t in loaded.eos_ids), None)
                texts.append((row, stop, tok.decode(row[:stop] if stop is not None else row,
                                                    skip_special_tokens=True).strip()))

        results: list[LLMResult | QuarantineError] = []
        for p, (row, stop, text) in zip(batch, texts, strict=True):
            req = p.request
            if stop is not None:
                finish, completion = "stop", stop + 1
            else:
                finish, completion = ("length" if len(row) >= cfg.max_tokens else "stop"), len(row)
            if not text:
                results.append(QuarantineError(Stage.llm, ReasonCode.llm_empty,
                                               f"{req.id}: the model produced no text "
                                               f"(finish_reason={finish}, {completion} tokens)"))
                continue
            gen = Generation(backend=self.name, model=cfg.model, revision=cfg.revision,
                             temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                             seed=req.seed, finish_reason=finish, prompt_tokens=len(p.ids),
                             completion_tokens=completion, attempts=attempt, latency_s=round(latency, 6))
            results.append(LLMResult(id=req.id, text=text, generation=gen))
        return results
