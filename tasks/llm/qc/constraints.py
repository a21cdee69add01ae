"""Rule `format`: the response keeps the instruction's constraint tags ([json], [json=k1,k2],
[bullets=N], [one_sentence], [sentences<=N], [words<=N], … see tasks/instructions.py)."""

from __future__ import annotations

import re

from tasks.instructions import Constraint
from tasks.llm.qc.context import QCContext, QCVerdict, Response, fail
from tasks.llm.qc.text import HAS_ALNUM, prose

_BULLET = re.compile(r"^\s*(?:[-*•‣▪◦–—+]|\d{1,2}[.)])\s+\S")
_ABBREVIATIONS = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|approx|e\.g|i\.e|a\.m|p\.m|No)\.", re.IGNORECASE)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n+")


def count_sentences(text: str, transcript: str | None = None) -> int:
    """Sentences outside quoted speech; a line break always ends a sentence."""
    body = prose(text, transcript, placeholder=" QUOTE ")
    body = _ABBREVIATIONS.sub(lambda m: m.group(0).replace(".", ""), body)
    return sum(1 for part in _SENTENCE_SPLIT.split(body.strip()) if HAS_ALNUM.search(part))


def _check(r: Response, c: QCContext, k: Constraint) -> str | None:
    if k.kind == "json":
        if r.obj is None:
            return "response is not a single JSON object"
        have = {str(key).strip().lower() for key in r.obj}
        missing = [key for key in k.keys if key.lower() not in have]
        return f"JSON object lacks key(s) {missing}" if missing else None
    if k.kind == "bullets":
        lines = [line for line in r.text.splitlines() if line.strip()]
        bullets = sum(1 for line in lines if _BULLET.match(line))
        if bullets != len(lines):
            return f"{len(lines) - bullets} non-bullet line(s) next to {bullets} bullet(s)"
        return None if k.allows(bullets) else f"{bullets} bullet(s), instruction asks for {k.bounds_text()}"
    if k.kind == "sentences":
        n = count_sentences(r.text, c.transcript)
        return None if k.allows(n) else f"{n} sentence(s), instruction asks for {k.bounds_text()}"
    n = r.words
    return None if k.allows(n) else f"{n} word(s), instruction asks for {k.bounds_text()}"


def format_tags(r: Response, c: QCContext) -> QCVerdict | None:
    for k in c.instruction.constraints:
        problem = _check(r, c, k)
        if problem:
            return fail("format", f"{k.tag}: {problem}")
    return None
