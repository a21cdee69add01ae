"""Rule `wrong_language`: a cheap heuristic, not a language identifier.

1. Script: for a language with a known script (Latin for en/es/fr/…, Han for zh, Cyrillic for ru, …),
   fewer than half of the letters in that script (with ≥ 10 letters) fails.
2. Stopwords (the lexicon's `stopwords`: en es fr de it pt nl): with ≥ 6 words, another language's
   stopword share ≥ 0.2 and above the expected one's fails; with ≥ 12 words, an expected share
   < 0.05 fails.
Judged on the response's own words (quotes, transcript and JSON keys removed). Limits: short answers
pass; languages without a list get only the script check; unknown codes pass; mixed-language answers
pass when the expected language's function words dominate.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from tasks.llm.qc.context import QCContext, QCVerdict, Response, fail
from tasks.llm.qc.lexicon import lexicon

_STOPWORDS: dict[str, frozenset[str]] = {lang: frozenset(words) for lang, words in lexicon().stopwords.items()}
_LATIN_LANGUAGES = frozenset(lexicon().latin_script_languages)
_SCRIPTS: dict[str, tuple[str, ...]] = {lang: tuple(s) for lang, s in lexicon().language_scripts.items()}
_LETTERS = re.compile(r"[^\W\d_]+")
_NOT_LETTERS = re.compile(r"[\W\d_]+")


@functools.lru_cache(maxsize=8192)
def script(ch: str) -> str:
    """The Unicode script of a letter. Called for every letter of every response: ASCII letters
    answer at once and the rest are remembered (why: docs/decisions.md)."""
    if ch.isascii() and ch.isalpha():
        return "LATIN"
    try:
        return unicodedata.name(ch).split(" ")[0]
    except ValueError:
        return "UNKNOWN"


def wrong_language(r: Response, c: QCContext) -> QCVerdict | None:
    language = (c.config.language or "").split("-")[0].split("_")[0].lower()
    if not language:
        return None
    detail = _language_problem(r.prose, language)
    return fail("wrong_language", detail) if detail else None


def _language_problem(prose: str, language: str) -> str | None:
    # ASCII: the letters are what the regex leaves (one C pass); else exactly what isalpha() says.
    ascii_prose = prose.isascii()
    letters = _NOT_LETTERS.sub("", prose) if ascii_prose else [ch for ch in prose if ch.isalpha()]
    scripts = ("LATIN",) if language in _LATIN_LANGUAGES else _SCRIPTS.get(language)
    if scripts and len(letters) >= 10:
        ascii_latin = "LATIN" in scripts and ascii_prose  # every ASCII letter is Latin
        share = 1.0 if ascii_latin else sum(1 for ch in letters if script(ch) in scripts) / len(letters)
        if share < 0.5:
            return f"only {share:.0%} of letters are in the script of {language!r}"
    expected = _STOPWORDS.get(language)
    tokens = [t.lower() for t in _LETTERS.findall(prose)]
    if expected is None or len(tokens) < 6:
        return None
    ratios = {lang: sum(1 for t in tokens if t in words) / len(tokens) for lang, words in _STOPWORDS.items()}
    mine = ratios[language]
    other, best = max(((lang, r) for lang, r in ratios.items() if lang != language), key=lambda x: x[1])
    if best >= 0.2 and best > mine:
        return f"reads as {other!r} (stopword share {best:.2f} vs {mine:.2f} for {language!r})"
    if len(tokens) >= 12 and mine < 0.05:
        return f"almost no {language!r} function words ({mine:.2f} of {len(tokens)} words)"
    return None
