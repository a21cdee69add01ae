"""QC's word lists and phrase patterns: tasks/resources/qc_lexicon_v1.json, read once per process.

Kept as data so that a reviewer sees (and edits) the vocabularies in one place, apart from the rules
that use them. Validated here, at the boundary: a malformed file fails on first use with the key.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from pydantic import BaseModel, ConfigDict

LEXICON_FILE = "qc_lexicon_v1.json"


class GenderWords(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    adjectives: list[str]
    nouns: list[str]
    subject: str
    possessive: str


class Lexicon(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    about: str
    refusal_patterns: list[str]
    injection_markers: list[str]
    injection_not_demands: list[str]
    leak_phrases: list[str]
    negations: list[str]
    emotion_words: dict[str, list[str]]  # canonical emotion -> the words a response may use for it
    emotion_compatible: dict[str, list[str]]  # made symmetric by the contradiction rule
    gender_words: dict[str, GenderWords]  # "male" / "female"
    accent_words: list[str]  # "-" stands for a space or a hyphen
    accent_families: dict[str, list[str]]
    native_english_accents: list[str]
    age_decades: dict[str, int]
    age_words: dict[str, tuple[int, int]]
    age_trigger_words: list[str]
    age_trigger_prefixes: list[str]
    stopwords: dict[str, list[str]]  # language code -> function words
    latin_script_languages: list[str]
    language_scripts: dict[str, list[str]]  # language code -> Unicode script names


@lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    """The shipped lexicon (parsed and validated once)."""
    raw = resources.files("tasks.resources").joinpath(LEXICON_FILE).read_bytes()
    return Lexicon.model_validate_json(raw)
