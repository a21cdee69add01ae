"""Prompts rendered with the target backbone's own chat template (DeSTA2: same template for
generation and for training): the helpers every backend that renders prompts shares (not a backend).

`render_prompt(messages, tokenizer_path)` loads the tokenizer saved at a local path (never
downloads) and renders `messages` with its chat template plus the generation prompt, exactly as
`transformers` does (`apply_chat_template(..., tokenize=False, add_generation_prompt=True)`). The
text it returns is what `prompt_format: completion` sends to the server, byte for byte.

The rendered text already holds every special token the template asks for (a BOS token too, for
templates such as Llama 3's): whoever tokenizes it must not add special tokens again
(`add_special_tokens=False`), or the model sees two BOS tokens.

Tokenizers are cached per (path, revision) for the life of the process; transformers is imported
inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from schemas.records import Message
from tasks.llm.base import LocalLLMUnavailable

__all__ = ["FALLBACK_CHAT_TEMPLATE", "apply_template", "check_tokenizer", "clear_cache", "load_tokenizer",
           "message_dicts", "render_prompt"]

# Used only by the in-process `transformers` backend, and only for a tokenizer that ships no chat
# template (a base model): each turn is `<|role|>`, a newline, the content and a newline; the
# generation prompt is `<|assistant|>` and a newline. `render_prompt` never falls back: a completion
# prompt must be the backbone's own template or the whole point (same template as training) is lost.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


_lock = threading.Lock()
_tokenizers: dict[tuple[str, str | None], Any] = {}


def message_dicts(messages: Sequence[Message | Mapping[str, Any]]) -> list[dict[str, str]]:
    """`[{"role": ..., "content": ...}]`, the shape chat templates and vLLM's `chat` take."""
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append({"role": m.role, "content": m.content})
        else:
            out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def load_tokenizer(path: str | None, *, setting: str = "llm.tokenizer", revision: str | None = None) -> Any:
    """The tokenizer saved in local directory `path` (cached); LocalLLMUnavailable naming `setting` if not."""
    if not path or not str(path).strip():
        raise LocalLLMUnavailable(f"{setting} is not set: prompt_format 'completion' renders prompts with "
                                  "the backbone's chat template and needs its tokenizer's local directory")
    local = Path(str(path).strip()).expanduser()
    if not local.is_dir():
        raise LocalLLMUnavailable(f"{setting}: no tokenizer directory at {str(path)!r} (give the local "
                                  "directory holding tokenizer_config.json, as written by save_pretrained)")
    key = (str(local.resolve()), revision)
    with _lock:
        cached = _tokenizers.get(key)
        if cached is not None:
            return cached
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise LocalLLMUnavailable(f"{setting}: rendering chat templates needs transformers (the `models` "
                                      f"extra: pip install 'speechpairs[models]'): {exc}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local), revision=revision, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - OSError (files missing), ValueError (unknown class), …
            raise LocalLLMUnavailable(f"{setting}: cannot load a tokenizer from {str(path)!r}: "
                                      f"{type(exc).__name__}: {exc}") from None
        _tokenizers[key] = tokenizer
        return tokenizer


def apply_template(tokenizer: Any, messages: Sequence[Message | Mapping[str, Any]], *,
                   fallback: bool = False, setting: str = "llm.tokenizer") -> str:
    """`messages` rendered with the tokenizer's chat template and the generation prompt.

    Without a template: FALLBACK_CHAT_TEMPLATE when `fallback`, else LocalLLMUnavailable naming `setting`.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        if not fallback:
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise LocalLLMUnavailable(f"{setting}: {name!r} has no chat template (tokenizer_config.json "
                                      "'chat_template' or chat_template.jinja); prompt_format 'completion' "
                                      "needs the backbone's own template - point it at the instruct model's "
                                      "tokenizer")
        template = FALLBACK_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(message_dicts(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    if not isinstance(text, str):  # defensive: tokenize=False returns the text
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def render_prompt(messages: Sequence[Message | Mapping[str, Any]], tokenizer_path: str | None) -> str:
    """The completion prompt for `messages`: the local tokenizer's own chat template + generation prompt."""
    return apply_template(load_tokenizer(tokenizer_path), messages)


def check_tokenizer(path: str | None, setting: str = "llm.tokenizer") -> None:
    """Preflight for `prompt_format: completion`: the tokenizer loads and carries a chat template."""
    tokenizer = load_tokenizer(path, setting=setting)
    if not getattr(tokenizer, "chat_template", None):
        raise LocalLLMUnavailable(f"{setting}: the tokenizer at {path!r} has no chat template "
                                  "(tokenizer_config.json 'chat_template' or chat_template.jinja); "
                                  "prompt_format 'completion' needs the backbone's own template")


def clear_cache() -> None:
    """Forget cached tokenizers (tests; a tokenizer directory rewritten in place)."""
    with _lock:
        _tokenizers.clear()
