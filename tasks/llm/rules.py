"""The `rules` backend: a deterministic description built from the clip's words, no model.

For demos, tests and CPU-only runs (`llm.backend: rules`; `template`, its first name, still works).
The phrasing varies by a stable hash of (clip id, seed) among a few sentence templates, so the
dataset is not one sentence shape. Rows record it as backend/model `template`, revision 1: the
name every version made with it carries (docs/decisions.md, "LLM stage").
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

from schemas.config import LLMConfig
from schemas.records import Generation, QuarantineError, ReasonCode, Stage
from tasks.llm.base import LLMBackend, LLMRequest, LLMResult, OnResult, reported

RECORDED_NAME = "template"  # generation.backend/model of its rows, unchanged by the rename
TEMPLATE_REVISION = "1"

# Values that carry no information and are left out of the sentence.
_MISSING = {"", "unknown", "unk", "none", "n/a", "na", "null", "nan", "?", "-"}

# Labels handled inside the main sentence (everything else becomes a trailing sentence).
_SPEAKER_LABELS = {"gender", "age", "accent"}
_MANNER_LABELS = {"pitch", "speaking speed", "volume", "emotion"}
_IGNORED_LABELS = {"duration"}  # duration_s is used instead

_GENDER_WORDS = {"f": "female", "m": "male", "woman": "female", "man": "male"}

_WITH_TEXT = (
    'From the {dur}audio clip, I can hear {speaker}{voice} say "{text}"{manner}.',
    'The {dur}audio clip contains {speaker}{voice} saying "{text}"{manner}.',
    'In this {dur}recording, {speaker}{voice} says "{text}"{manner}.',
    'Listening to this {dur}clip, I hear {speaker}{voice} saying "{text}"{manner}.',
)
_WITHOUT_TEXT = (
    "From the {dur}audio clip, I can hear {speaker}{voice} speaking{manner}.",
    "The {dur}audio clip features {speaker}{voice} talking{manner}.",
    "In this {dur}recording, {speaker}{voice} is speaking{manner}.",
    "Listening to this {dur}clip, I hear {speaker}{voice} speaking{manner}.",
)


def _article(word: str) -> str:
    w = word.lower()
    if re.match(r"(8|11|18)(\D|$)", w) or (w[:1] in "aeiou" and not w.startswith(("uni", "eu", "one"))):
        return "an"
    return "a"


def _lower(value: str) -> str:
    """Lower-case plain words, keep tokens like "dB", "C50", "SNR" as written."""
    return " ".join(t if (any(c.isdigit() for c in t) or any(c.isupper() for c in t[1:])) else t.lower()
                    for t in value.split())


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    v = " ".join(str(value).split())
    return None if v.lower() in _MISSING else v


def _pitch(v: str) -> str:
    core = re.sub(r"[- ]?pitch(ed)?$", "", v.lower()).strip()
    if not core:
        return ""
    return f" with {_article(core)} {core}-pitched voice"


def _speed(v: str) -> str:
    w = v.lower()
    if w.endswith("ly"):  # "very slowly", "quickly"
        return w
    if re.search(r"\b(speed|pace|rate)\b", w):  # "moderate speed"
        return f"at {_article(w)} {w}"
    return f"at {_article(w)} {w} pace"


def _volume(v: str) -> str:
    w = v.lower()
    if re.search(r"\b(quiet|loud|soft)\b", w):  # "Very quiet" -> "in a very quiet voice"
        return f"in {_article(w)} {w} voice"
    if "volume" in w:
        return f"at {_article(w)} {w}"
    return f"at {_article(w)} {w} volume"


def _emotion(v: str) -> str:
    w = v.lower()
    if w.endswith(("tone", "voice")):
        return f"in {_article(w)} {w}"
    return f"in {_article(w)} {w} tone"


def _accent(v: str) -> str:
    # Accents are mostly proper adjectives ("English", "American"): capitalise the first letter only.
    return v[:1].upper() + v[1:]


def _age(v: str) -> str:
    if re.fullmatch(r"\d{1,3}", v):
        return f"{v}-year-old"
    return v.lower()


def _duration(duration_s: float) -> str:
    if duration_s is None or not math.isfinite(duration_s) or duration_s <= 0:
        return ""
    return f"{max(1, round(duration_s))}-second "


def _transcript(text: str | None) -> str | None:
    t = _clean(text)
    if t is None:
        return None
    t = t.strip().strip('"').strip()  # stray quotes around a transcript (noted in DeSTA2's clean-up)
    t = t.replace('"', "'")
    return t or None


def variant(clip_id: str, seed: int, n: int) -> int:
    """Stable (process-independent) choice in range(n) from (clip id, seed)."""
    digest = hashlib.sha256(f"{clip_id}\x00{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def describe(request: LLMRequest) -> str:
    """The template response for one request."""
    attrs: dict[str, str] = {}
    for label, value in request.attributes.items():
        v = _clean(value)
        if v is not None:
            attrs[label.strip().lower()] = v

    words: list[str] = []
    if "age" in attrs:
        words.append(_age(attrs["age"]))
    if "gender" in attrs:
        g = attrs["gender"].lower()
        words.append(_GENDER_WORDS.get(g, g))
    if "accent" in attrs:
        words.append(_accent(attrs["accent"]))
    noun = " ".join([*words, "speaker"])
    speaker = f"{_article(noun)} {noun}"

    voice = _pitch(attrs["pitch"]) if "pitch" in attrs else ""
    manner_parts = []
    if "speaking speed" in attrs:
        manner_parts.append(_speed(attrs["speaking speed"]))
    if "volume" in attrs:
        manner_parts.append(_volume(attrs["volume"]))
    if "emotion" in attrs:
        manner_parts.append(_emotion(attrs["emotion"]))
    manner = (" " + ", ".join(manner_parts)) if manner_parts else ""

    text = _transcript(request.transcript)
    templates = _WITH_TEXT if text is not None else _WITHOUT_TEXT
    template = templates[variant(request.id, request.seed, len(templates))]
    sentence = template.format(dur=_duration(request.duration_s), speaker=speaker, voice=voice,
                               manner=manner, text=text)

    extras = []
    if "noise level" in attrs:
        extras.append(f"The background noise level is {_lower(attrs['noise level'])}.")
    if "reverberation" in attrs:
        extras.append(f"The reverberation is {_lower(attrs['reverberation'])}.")
    for label, value in attrs.items():
        if label in _SPEAKER_LABELS | _MANNER_LABELS | _IGNORED_LABELS | {"noise level", "reverberation"}:
            continue
        extras.append(f"The {label} is {_lower(value)}.")
    return " ".join([sentence, *extras])


class RulesBackend(LLMBackend):
    """Deterministic, model-free backend."""

    name = RECORDED_NAME
    config: LLMConfig
    cacheable = False  # free, and its output depends on the clip id and attributes, not in the cache key

    def __init__(self, config: LLMConfig | None = None) -> None:
        self.config = config or LLMConfig()

    def model_info(self) -> dict[str, str | None]:
        return {"name": RECORDED_NAME, "revision": TEMPLATE_REVISION}

    def generate(self, requests: Sequence[LLMRequest],
                 on_result: OnResult | None = None) -> list[LLMResult | QuarantineError]:
        out: list[LLMResult | QuarantineError] = []
        for req in requests:
            try:
                text = describe(req)
            except Exception as exc:  # noqa: BLE001 — one bad request must not sink the batch
                out.append(QuarantineError(Stage.llm, ReasonCode.llm_error,
                                           f"{req.id}: template failed: {type(exc).__name__}: {exc}"))
                continue
            if not text.strip():
                out.append(QuarantineError(Stage.llm, ReasonCode.llm_empty, f"{req.id}: template produced no text"))
                continue
            gen = Generation(backend=RECORDED_NAME, model=RECORDED_NAME, revision=TEMPLATE_REVISION, seed=req.seed,
                             finish_reason="stop", completion_tokens=len(text.split()), attempts=1)
            out.append(LLMResult(id=req.id, text=text, generation=gen))
        return reported(out, on_result)
