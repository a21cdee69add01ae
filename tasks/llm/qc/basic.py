"""The simple rules: empty, truncated, refusal, too_short, too_long."""

from __future__ import annotations

import re

from tasks.llm.qc.context import QCContext, QCVerdict, Response, fail
from tasks.llm.qc.lexicon import lexicon
from tasks.llm.qc.text import HAS_ALNUM, alts


def empty(r: Response, c: QCContext) -> QCVerdict | None:
    """No letter or digit at all."""
    return None if HAS_ALNUM.search(r.text) else fail("empty", "no words in the response")


def truncated(r: Response, c: QCContext) -> QCVerdict | None:
    """The answer was cut at max_tokens."""
    if (c.finish_reason or "").lower() == "length":
        return fail("truncated", "finish_reason is 'length' (cut at max_tokens)")
    return None


_REFUSAL = re.compile(alts(*lexicon().refusal_patterns), re.IGNORECASE)


def refusal(r: Response, c: QCContext) -> QCVerdict | None:
    """"As an AI…", "I cannot hear…", "I'm unable to listen…" (the lexicon's refusal_patterns)."""
    match = _REFUSAL.search(r.text.replace("’", "'"))
    return fail("refusal", f"refusal phrase {match.group(0)!r}") if match else None


def too_short(r: Response, c: QCContext) -> QCVerdict | None:
    """Fewer words than config.min_words (relaxed by a word-limit tag; skipped for [json])."""
    if c.instruction.constraint("json") is not None:
        return None
    limit = c.config.min_words
    words = c.instruction.constraint("words")
    if words is not None:
        limit = min(limit, words.lo if words.lo is not None else 1, words.hi if words.hi is not None else limit)
    return fail("too_short", f"{r.words} word(s) < minimum {limit}") if r.words < limit else None


def too_long(r: Response, c: QCContext) -> QCVerdict | None:
    """More words than config.max_words (raised to N by [words<=N], to 2N by [words>=N])."""
    limit = c.config.max_words
    words = c.instruction.constraint("words")
    if words is not None:  # the tag's own bound governs; [words>=N] alone allows up to 2N
        limit = max(limit, words.hi if words.hi is not None else 2 * (words.lo or 0))
    return fail("too_long", f"{r.words} word(s) > maximum {limit}") if r.words > limit else None
