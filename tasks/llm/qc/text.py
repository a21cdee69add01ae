"""Text helpers shared by the QC rules: counting words, normalising, the response as prose, JSON."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

HAS_ALNUM = re.compile(r"[^\W_]")
_WORD_TOKEN = re.compile(r"\S+")
_ALNUM_TOKEN = re.compile(r"\S*[^\W_]\S*")  # a whitespace-separated token holding a letter or digit
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W_]+")


def count_words(text: str) -> int:
    """Whitespace-separated tokens holding a letter or digit (bullet dashes don't count); in scripts
    written without spaces (Han, Kana) each character counts as a word."""
    if not _CJK.search(text):
        return len(_ALNUM_TOKEN.findall(text))
    n = 0
    for tok in _WORD_TOKEN.findall(text):
        cjk = len(_CJK.findall(tok))
        n += cjk + (1 if HAS_ALNUM.search(_CJK.sub("", tok) if cjk else tok) else 0)
    return n


def norm(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: for comparing short strings."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def alts(*patterns: str) -> str:
    """Regex alternation of the patterns."""
    return "|".join(patterns)


def words_of(text: str) -> frozenset[str]:
    """The lower-cased runs of letters and digits in `text`: what a scan's trigger words are looked up in."""
    return frozenset(_WORD.findall(text.lower()))


def first_words(phrases: Iterable[str]) -> frozenset[str]:
    """The first word of each phrase ("matter-of-fact" → "matter", "new zealand" → "new")."""
    return frozenset(m.group(0) for p in phrases if (m := _WORD.search(p.lower())))


@dataclass(frozen=True)
class Scan:
    """A costly regex (a large case-insensitive alternation) run only when the answer holds a word
    that every match of it must contain (`triggers`, or a word starting with one of `prefixes`): a
    set lookup is far cheaper, and most answers name no age, accent or emotion (figures in
    docs/decisions.md). tests/unit/tasks/llm/test_qc.py checks the triggers against every pattern's matches."""

    pattern: re.Pattern[str]
    triggers: frozenset[str]
    prefixes: tuple[str, ...] = ()

    def may_match(self, words: frozenset[str]) -> bool:
        return not words.isdisjoint(self.triggers) or bool(self.prefixes) and \
            any(w.startswith(self.prefixes) for w in words)

    def finditer(self, text: str, words: frozenset[str]) -> Iterable[re.Match[str]]:
        return self.pattern.finditer(text) if self.may_match(words) else ()


# -- the response as prose: quotes and the transcript removed ------------------------------------

_QUOTED = re.compile(r'"[^"\n]*"|“[^”]*”|«[^»]*»|„[^“”]*[“”]|「[^」]*」|(?<![\w\'])\'[^\'\n]{2,}?\'(?!\w)')


@functools.lru_cache(maxsize=4096)  # a request and its regenerations share a transcript
def _transcript_pattern(transcript: str | None) -> re.Pattern[str] | None:
    words = re.findall(r"[^\W_]+(?:['’][^\W_]+)*", transcript or "")
    if not words:
        return None
    return re.compile(r"[\W_]*".join(re.escape(w) for w in words), re.IGNORECASE)


def prose(text: str, transcript: str | None, placeholder: str = " ") -> str:
    """`text` without the transcript's words and without quoted spans: the response's own words."""
    pattern = _transcript_pattern(transcript)
    if pattern is not None:
        text = pattern.sub(placeholder, text)
    return _QUOTED.sub(placeholder, text)


def json_object(text: str) -> dict[str, Any] | None:
    """The response as one JSON object, or None when it is anything else."""
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_strings(value: Any) -> list[str]:
    """Every string inside a JSON value, depth first."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in json_strings(v)]
    return []
