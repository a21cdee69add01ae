"""LLM stage: backends that turn seed descriptions + instructions into responses."""

from tasks.llm.base import LLMBackend, LLMRequest, LLMResult, make_backend
from tasks.llm.messages import build_messages

__all__ = ["LLMBackend", "LLMRequest", "LLMResult", "build_messages", "make_backend"]
