"""Rule `leaks_seed`: the response shows the seed instead of describing the audio: a bracketed
timestamp span, a "Label: value, Label: …" list, a "Gender: Female"-style pair that copies a seed
value (a heading like "**Pitch:** the voice is high" is fine), or a mention of the seed itself
("seed description", "metadata", "the transcript says", "according to the description", …)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from schemas.attributes import ATTRIBUTE_LABELS
from tasks.features.labels import normalise_label
from tasks.llm.qc.context import QCContext, QCVerdict, Response, attribute, fail
from tasks.llm.qc.lexicon import lexicon
from tasks.llm.qc.text import alts, norm

_TIME = r"\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?"
_TIMESTAMP = re.compile(r"[\[(]\s*" + _TIME + r"\s*(?:-|–|—|to)\s*" + _TIME + r"\s*[\])]|"
                        r"\b\d{2}:\d{2}(?::\d{2})?\s*(?:-|–|—)\s*\d{2}:\d{2}(?::\d{2})?\b")
_LEAK_PHRASES = re.compile(alts(*lexicon().leak_phrases), re.IGNORECASE)
_LABELS = sorted({*ATTRIBUTE_LABELS.values(), "Speed", "Noise", "SNR", "C50"}, key=len, reverse=True)
_LABEL_ALT = "|".join(re.escape(label) for label in _LABELS)
_LABEL_PAIR = re.compile(r"(?:^|(?<=[\s(,;*•\-]))(" + _LABEL_ALT + r")\s*\**\s*:\s*\**\s*[\"'“]?([^\n,;.()\"”]{0,60})",
                         re.IGNORECASE | re.MULTILINE)
_LABEL_LIST = re.compile(r"\b(?:" + _LABEL_ALT + r")\s*:\s*[^,;\n:]{1,40}[,;]\s*(?:" + _LABEL_ALT + r")\s*:",
                         re.IGNORECASE)
_LABEL_ALIASES = {"speed": "speaking speed", "noise": "noise level"}
_CANONICAL_LABELS = {"gender": "gender", "emotion": "emotion", "age": "age", "accent": "accent"}


def _copies_seed_value(label: str, said: str, attributes: Mapping[str, str]) -> bool:
    """Does "Label: said" repeat the seed's value for that label ("Gender: female", "Pitch: High")?"""
    key = label.strip().lower()
    value = attribute(attributes, _LABEL_ALIASES.get(key, key))
    said_n, value_n = norm(said), norm(value or "")
    if not value_n or not said_n:
        return False
    if said_n == value_n or said_n.startswith(value_n + " "):
        return True
    canonical = _CANONICAL_LABELS.get(key)
    if canonical is None:
        return False
    first = said_n.split()[0]
    return normalise_label(canonical, first) == normalise_label(canonical, value_n)


def leaks_seed(r: Response, c: QCContext) -> QCVerdict | None:
    detail = _leak(r, c)
    return fail("leaks_seed", detail) if detail else None


def _leak(r: Response, c: QCContext) -> str | None:
    colon = ":" in r.prose  # a timestamp and a "Label: value" both hold one: skip their scans without
    match = _TIMESTAMP.search(r.prose) if colon else None
    if match:
        return f"timestamp span {match.group(0)!r} from the seed format"
    if r.obj is None and colon:
        listed = _LABEL_LIST.search(r.prose)
        if listed:
            return f"seed-style 'Label: value, Label: …' list ({listed.group(0)!r})"
        for pair in _LABEL_PAIR.finditer(r.prose):
            if _copies_seed_value(pair.group(1), pair.group(2), c.attributes):
                return f"seed-style pair {pair.group(1)}: {pair.group(2).strip()!r} copies the seed"
    match = _LEAK_PHRASES.search(r.prose)
    if match:
        return f"mentions the seed/metadata ({match.group(0)!r})"
    return None
