"""Phonemes per second from an offline G2P (phonemizer over espeak-ng) and the VAD's speech time."""

from __future__ import annotations

import pytest

from tasks.features import extract_features
from tasks.features.phonemes import phoneme_counts, phoneme_rate
from tests.support.speech import SR, TEXT


def test_phoneme_counts_are_plausible_and_batch_safe() -> None:
    pytest.importorskip("phonemizer")
    counts = phoneme_counts(["he turned sharply", "", None, "he turned sharply and faced gregson across the table"])
    assert counts[1] is None and counts[2] is None
    assert counts[0] is not None and counts[3] is not None
    assert 9 <= counts[0] <= 13  # h i t ɜ n d ʃ ɑ p l i (espeak's exact split varies a little)
    assert counts[3] > 2.5 * counts[0]
    assert phoneme_counts(["he turned sharply"]) == [counts[0]]  # batching does not change counts


def test_language_names_and_regional_codes_map_to_voices() -> None:
    pytest.importorskip("phonemizer")
    [en] = phoneme_counts(["good morning"], language="en")
    assert phoneme_counts(["good morning"], language="English") == [en]
    assert phoneme_counts(["good morning"], language="en_US") == [en]


def test_unknown_language_leaves_the_rate_empty() -> None:
    pytest.importorskip("phonemizer")
    assert phoneme_counts(["some text"], language="zz-not-a-language") == [None]


def test_phoneme_rate_rises_with_espeak_speed(espeak) -> None:
    pytest.importorskip("phonemizer")
    [count] = phoneme_counts([TEXT])
    rates = []
    for speed in (80, 130, 180, 230, 280):
        feats = extract_features(espeak("-v", "en", "-s", str(speed)), SR, TEXT, {})
        rates.append(phoneme_rate(count, feats.speech_duration_s))
    assert all(r is not None for r in rates)
    assert rates == sorted(rates) and len(set(rates)) == 5, rates
    assert 5 < rates[2] < 25  # phonemes/s of ordinary speech; dataspeech's bins span 0-26.8
