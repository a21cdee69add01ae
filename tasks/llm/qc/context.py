"""What a QC rule sees: the response (with the views rules read, computed once) and its context."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.config import QCConfig, QCRule
from tasks.instructions import Instruction
from tasks.llm.qc.text import count_words, json_object, json_strings, prose, words_of


@dataclass(frozen=True)
class QCVerdict:
    """`check_response`'s answer: ok, or the first failing rule (`reason`) and what it found."""

    ok: bool
    reason: QCRule | None = None
    detail: str = ""


PASS = QCVerdict(ok=True)


def fail(rule: QCRule, detail: str) -> QCVerdict:
    """A rule's failure reason: its own code and what it found."""
    return QCVerdict(ok=False, reason=rule, detail=detail)


@dataclass(frozen=True)
class QCContext:
    """What a response is judged against: the clip's seed, its attributes (display label → word),
    the transcript as the model saw it, the instruction asked, the finish reason, the QC config."""

    seed: str
    attributes: Mapping[str, str]
    transcript: str | None
    instruction: Instruction
    finish_reason: str | None
    config: QCConfig


@dataclass(frozen=True)
class Response:
    """A response and the views of it rules read: stripped `text`, the JSON object it is (if any),
    its `prose` (its own words: quotes and the transcript removed; for JSON, the string values
    with the transcript removed), its word count and the set of words in its prose."""

    raw: str
    text: str
    obj: dict[str, Any] | None
    prose: str
    words: int
    prose_words: frozenset[str]

    @classmethod
    def of(cls, raw: str, transcript: str | None) -> Response:
        text = raw.strip()
        obj = json_object(text)
        if obj is None:
            own = prose(text, transcript)
        else:  # JSON values are already strings: only the transcript is removed from them, not quotes
            own = prose(". ".join(json_strings(obj)), transcript).replace('"', " ")
        return cls(raw=raw, text=text, obj=obj, prose=own, words=count_words(text), prose_words=words_of(own))


# -- seed attributes ---------------------------------------------------------------------------

_SEED_ATTRS = re.compile(r"\(([^()]*:[^()]*)\)\s*$")


def seed_attributes(seed_description: str) -> dict[str, str]:
    """`"[00:00-00:05] hi (Gender: Female, Accent: american, southern)"` → {"Gender": "Female", "Accent": …}."""
    match = _SEED_ATTRS.search(seed_description.strip())
    if not match:
        return {}
    out: dict[str, str] = {}
    last: str | None = None
    for part in match.group(1).split(","):
        label, sep, value = part.partition(":")
        if sep and label.strip():
            last = label.strip()
            out[last] = value.strip()
        elif last is not None:  # a comma inside a value ("american, southern")
            out[last] = f"{out[last]}, {part.strip()}"
    return out


def attribute(attributes: Mapping[str, str], label: str) -> str | None:
    """The seed's value for `label` (case-insensitive), None when absent or blank."""
    for key, value in attributes.items():
        if key.strip().lower() == label and value and str(value).strip():
            return str(value).strip()
    return None
