"""Label normalisation table and the corpus > classifier > heuristic precedence with provenance."""

from __future__ import annotations

import pytest

from schemas.records import Features
from tasks.features.labels import CANONICAL, corpus_label, normalise_label, resolve_attributes

NORMALISE_CASES = [
    # emotion: CREMA-D codes and vote letters, IEMOCAP, ESD, MELD, RAVDESS, TESS, SenseVoice, emotion2vec
    ("emotion", "ang", "angry"),
    ("emotion", "angry", "angry"),
    ("emotion", "Anger", "angry"),
    ("emotion", "ANG", "angry"),
    ("emotion", "A", "angry"),
    ("emotion", "hap", "happy"),
    ("emotion", "Happiness", "happy"),
    ("emotion", "joy", "happy"),
    ("emotion", "exc", "excited"),
    ("emotion", "NEU", "neutral"),
    ("emotion", "sadness", "sad"),
    ("emotion", "FEA", "fearful"),
    ("emotion", "fear", "fearful"),
    ("emotion", "DIS", "disgusted"),
    ("emotion", "Surprise", "surprised"),
    ("emotion", "ps", "surprised"),
    ("emotion", "calm", "calm"),
    ("emotion", "fru", "frustrated"),
    ("emotion", "<|HAPPY|>", "happy"),
    ("emotion", "生气/angry", "angry"),
    ("emotion", "Sarcastic", "sarcastic"),  # unknown: cleaned text, never invented
    # gender
    ("gender", "F", "female"),
    ("gender", "female", "female"),
    ("gender", " Woman ", "female"),
    ("gender", "w", "female"),
    ("gender", "female_feminine", "female"),
    ("gender", "M", "male"),
    ("gender", "Male", "male"),
    ("gender", "man", "male"),
    ("gender", "male_masculine", "male"),
    # age: numbers stay numbers, Common Voice groups (with its "fourties") become words
    ("age", "23", "23"),
    ("age", "23.0", "23"),
    ("age", "41 years old", "41"),
    ("age", "teens", "teens"),
    ("age", "twenties", "twenties"),
    ("age", "fourties", "forties"),
    ("age", "Sixties", "sixties"),
    ("age", "20 - 29", "twenties"),
    ("age", "25-34", "25-34"),
    ("age", "Elderly", "senior"),
    # accent: VCTK, Common Voice old codes and new phrases, L2-ARCTIC L1s
    ("accent", "us", "american"),
    ("accent", "American", "american"),
    ("accent", "United States English", "american"),
    ("accent", "england", "english"),
    ("accent", "English", "english"),
    ("accent", "NorthernIrish", "northern irish"),
    ("accent", "SouthAfrican", "south african"),
    ("accent", "newzealand", "new zealand"),
    ("accent", "India and South Asia (India, Pakistan, Sri Lanka)", "indian"),
    ("accent", "  Scottish ", "scottish"),
    ("accent", "Mandarin", "mandarin"),
    ("accent", "United States English|Southern", "american, southern"),
]


@pytest.mark.parametrize(("attribute", "raw", "expected"), NORMALISE_CASES)
def test_normalise_label(attribute: str, raw: str, expected: str) -> None:
    assert normalise_label(attribute, raw) == expected


@pytest.mark.parametrize("raw", ["", "  ", "unk", "UNKNOWN", "n/a", "N/A", "other", "xxx", "<unk>",
                                 "<|EMO_UNKNOWN|>", "do_not_wish_to_say", "None"])
@pytest.mark.parametrize("attribute", ["gender", "emotion", "age", "accent"])
def test_unknown_markers_are_none(attribute: str, raw: str) -> None:
    assert normalise_label(attribute, raw) is None


def test_table_shape_and_idempotence() -> None:
    assert set(CANONICAL) == {"gender", "emotion", "age", "accent"}
    for attribute, table in CANONICAL.items():
        for spelling, word in table.items():
            assert spelling == spelling.lower().strip(), (attribute, spelling)
            # a canonical word normalises to itself, so normalising twice changes nothing
            assert normalise_label(attribute, word) == word, (attribute, spelling, word)
    assert normalise_label("gender", None) is None
    with pytest.raises(ValueError, match="unknown attribute 'pitch'"):
        normalise_label("pitch", "high")


def test_corpus_label_keys() -> None:
    assert corpus_label("gender", {"Sex": "F"}) == "female"
    assert corpus_label("gender", {"GENDER": "m", "sex": "f"}) == "male"  # `gender` preferred to `sex`
    assert corpus_label("gender", {"gender": "unk", "sex": "f"}) == "female"  # unknown falls through
    assert corpus_label("emotion", {"Emotion": "ANG"}) == "angry"
    assert corpus_label("accent", {"accents": "England English"}) == "english"
    assert corpus_label("age", {"speaker": "p225"}) is None


PITCH = Features(pitch_mean_hz=120.0, gender="male", gender_score=0.9, gender_source="pitch_heuristic")
MODELS = {"gender": "org/gender-model", "emotion": "/models/emo", "age": "org/age", "accent": "org/accent"}


def test_corpus_beats_classifier_beats_heuristic() -> None:
    labels = {"Sex": "F", "emotion": "ANG"}
    before = dict(labels)
    out = resolve_attributes(PITCH, labels,
                             {"gender": ("male", 0.99), "emotion": ("sad", 0.97), "accent": ("us", 0.8)},
                             {"gender": 0.5, "emotion": 0.5, "accent": 0.5}, MODELS)
    assert (out.gender, out.gender_score, out.gender_source) == ("female", 1.0, "corpus")
    assert (out.emotion, out.emotion_score, out.emotion_source) == ("angry", 1.0, "corpus")
    assert (out.accent, out.accent_score, out.accent_source) == ("american", 0.8, "classifier:org/accent")
    assert (out.age, out.age_score, out.age_source) == (None, None, None)
    assert labels == before  # raw labels stay verbatim for the row's `labels`
    assert out.pitch_mean_hz == 120.0  # other measurements untouched
    assert PITCH.gender_source == "pitch_heuristic"  # the input is not mutated


def test_classifier_beats_pitch_heuristic() -> None:
    out = resolve_attributes(PITCH, {"speaker": "p1"}, {"gender": ("Female", 0.75)}, {"gender": 0.6}, MODELS)
    assert (out.gender, out.gender_score, out.gender_source) == ("female", 0.75,
                                                                 "classifier:org/gender-model")
    no_model_names = resolve_attributes(PITCH, {}, {"gender": ("f", 0.75)}, {"gender": 0.6})
    assert no_model_names.gender_source == "classifier"


def test_heuristic_kept_when_nothing_else() -> None:
    out = resolve_attributes(PITCH, {"gender": "unk"}, {"emotion": ("hap", 0.9)}, {"emotion": 0.5}, MODELS)
    assert (out.gender, out.gender_score, out.gender_source) == ("male", 0.9, "pitch_heuristic")
    assert (out.emotion, out.emotion_source) == ("happy", "classifier:/models/emo")


def test_below_threshold_leaves_attribute_out_but_keeps_score() -> None:
    out = resolve_attributes(PITCH, {}, {"gender": ("female", 0.55), "emotion": ("neu", 0.3)},
                             {"gender": 0.6, "emotion": 0.3}, MODELS)
    assert out.gender is None
    assert out.gender_score == pytest.approx(0.55)
    assert out.gender_source == "classifier_below_threshold:org/gender-model"
    # exactly at the threshold counts as confident
    assert (out.emotion, out.emotion_score, out.emotion_source) == ("neutral", 0.3, "classifier:/models/emo")


def test_unknown_prediction_is_ignored() -> None:
    out = resolve_attributes(PITCH, {}, {"gender": ("unk", 0.99), "emotion": ("<|EMO_UNKNOWN|>", 0.9)},
                             {"gender": 0.5, "emotion": 0.5}, MODELS)
    assert (out.gender, out.gender_source) == ("male", "pitch_heuristic")
    assert (out.emotion, out.emotion_score, out.emotion_source) == (None, None, None)


def test_corpus_label_key_names_the_column_that_won() -> None:
    from tasks.features.labels import corpus_label_key

    labels = {"Sex": "F", "gender": "unk", "Accents": "United States English|Southern", "age": "n/a"}
    # `gender` comes first in LABEL_KEYS but says "no label", so `Sex` (as written) gives the word.
    assert corpus_label_key("gender", labels) == "Sex" and corpus_label("gender", labels) == "female"
    assert corpus_label_key("accent", labels) == "Accents"
    assert corpus_label_key("age", labels) is None and corpus_label_key("emotion", labels) is None


def test_no_label_markers_and_attribute_columns() -> None:
    from tasks.features.labels import is_attribute_label, is_no_label

    assert all(is_no_label(v) for v in (None, "", " N/A ", "unk", "<unk>", "Not specified"))
    assert not any(is_no_label(v) for v in ("Inform", "0", "positive"))
    assert all(is_attribute_label(k) for k in ("gender", "Sex", "emotion", "AGE", "accents"))
    assert not any(is_attribute_label(k) for k in ("act", "sentiment", "speaker", "region"))
