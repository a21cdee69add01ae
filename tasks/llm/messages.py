"""The chat messages of one clip, laid out exactly as DeSTA2 does it."""

from __future__ import annotations

from schemas.records import Message


def build_messages(seed_description: str, instruction: str, system_prompt: str | None = None) -> list[Message]:
    """Optional system message, then ONE user message: the seed, a newline, the instruction.

    The same layout is used later for training, so generation and training share one template.
    """
    messages: list[Message] = []
    if system_prompt:
        messages.append(Message(role="system", content=system_prompt))
    messages.append(Message(role="user", content=f"{seed_description}\n{instruction}"))
    return messages
