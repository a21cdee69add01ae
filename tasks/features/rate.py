"""Speaking rate from the transcript and the VAD's speech time: words/s and syllables/s.

Why a heuristic: counting English vowel groups (with silent -e/-ed/-es corrections) errs on
single words but averages out over a sentence, needs no lexicon or G2P model, and rates only
become coarse words ("slow", "fast"). Non-English text gets at least one syllable per word.
Dividing by speech time (not clip length) keeps leading/trailing silence and long pauses out
of the rate. Phonemes per second (`speaking_rate_pps`) come later from a phonemiser.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_SILENT_ED = re.compile(r"[^aeiouydt]ed$")  # "turned" (1), but "wanted", "needed" (2)
_SILENT_ES = re.compile(r"[^aeiouyszxhcg]es$")  # "makes" (1), but "faces", "boxes", "wishes" (2)


def words(text: str) -> list[str]:
    """Words of a transcript: runs of letters/digits, apostrophes inside a word kept ("don't")."""
    return _WORD.findall(text)


def word_syllables(word: str) -> int:
    """Syllables of one English word by vowel groups, with silent-e/-ed/-es corrections (>= 1)."""
    w = word.lower().replace("'", "").replace("’", "")
    if w.isdigit():
        return len(w)  # a rough "one syllable per digit" for unnormalised numbers
    count = len(_VOWEL_GROUP.findall(w))
    if count > 1 and (
        (w.endswith("e") and not w.endswith(("le", "ee", "ye")))
        or _SILENT_ED.search(w)
        or _SILENT_ES.search(w)
    ):
        count -= 1
    return max(1, count)


def count_syllables(text: str) -> int:
    return sum(word_syllables(w) for w in words(text))


def speaking_rates(transcript: str | None, speech_duration_s: float | None) -> tuple[float | None, float | None]:
    """(words per second, syllables per second) of speech; (None, None) without text or speech."""
    if not transcript or not speech_duration_s or speech_duration_s <= 0:
        return None, None
    tokens = words(transcript)
    if not tokens:
        return None, None
    n_syllables = sum(word_syllables(w) for w in tokens)
    return len(tokens) / speech_duration_s, n_syllables / speech_duration_s
