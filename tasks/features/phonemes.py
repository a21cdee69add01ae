"""Phonemes per second of speech, comparable to dataspeech's speaking-rate bins.

The transcript goes through an offline G2P (phonemizer over Debian's espeak-ng) in one call per
batch, and the phone count is divided by the VAD's speech duration. Without phonemizer or the
espeak-ng library the rate stays None (words/s and syllables/s still exist), with one warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

PHONEME_VERSION = "phonemizer-espeak/1"
_LOCK = threading.Lock()  # espeak-ng keeps global state: one phonemize call at a time
_WARNED: set[str] = set()

# espeak voices for the language codes corpora and Whisper use most (else the code itself is tried).
_ESPEAK_LANG = {"en": "en-us", "fr": "fr-fr", "pt": "pt", "zh": "cmn", "es": "es", "de": "de", "it": "it"}
# Language names some manifests carry instead of codes (lhotse writes "English").
_LANG_NAMES = {"english": "en", "french": "fr", "portuguese": "pt", "chinese": "zh", "mandarin": "zh",
               "spanish": "es", "german": "de", "italian": "it", "japanese": "ja", "korean": "ko",
               "russian": "ru", "dutch": "nl", "polish": "pl", "arabic": "ar", "hindi": "hi"}


@lru_cache(maxsize=16)
def _backend(language: str) -> Any:
    from phonemizer.backend import EspeakBackend

    # phonemizer warns on every batch whose word count shifts (numbers, contractions): we count
    # phones, not words, so its chatter stays out of the run's logs.
    quiet = logging.getLogger("speechpairs.phonemizer")
    quiet.setLevel(logging.ERROR)
    return EspeakBackend(_ESPEAK_LANG.get(language, language), preserve_punctuation=False, with_stress=False,
                         language_switch="remove-flags", logger=quiet)


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


def phoneme_counts(texts: Sequence[str | None], language: str | None = "en") -> list[int | None]:
    """Phones in each text (None for empty text, or where G2P is unavailable for the language)."""
    wanted = [i for i, t in enumerate(texts) if t and t.strip()]
    out: list[int | None] = [None] * len(texts)
    if not wanted:
        return out
    lang = (language or "en").split("-")[0].split("_")[0].strip().lower()
    lang = _LANG_NAMES.get(lang, lang)
    try:
        from phonemizer.separator import Separator

        backend = _backend(lang)
        with _LOCK:
            phones = backend.phonemize([str(texts[i]) for i in wanted], separator=Separator(phone=" ", word=" | "),
                                       strip=True, njobs=1)
    except ImportError:
        _warn_once("import", "phonemizer is not installed: speaking_rate_pps stays empty")
        return out
    except RuntimeError as exc:  # espeak-ng library missing, or no voice for this language
        _warn_once(lang, f"no phonemizer voice for language {lang!r} ({exc}): speaking_rate_pps stays empty")
        return out
    for i, text in zip(wanted, phones, strict=True):
        count = sum(1 for tok in text.split() if tok != "|")
        out[i] = count or None
    return out


def phoneme_rate(count: int | None, speech_duration_s: float | None) -> float | None:
    if not count or not speech_duration_s or speech_duration_s <= 0:
        return None
    return count / speech_duration_s
