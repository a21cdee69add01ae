"""Speaker attributes: one canonical word per label, and which source wins.

Corpora spell the same thing many ways (CREMA-D `ANG`, IEMOCAP `ang`, ESD `Angry`, MELD `anger`;
Common Voice `fourties`, `male_masculine`, `United States English`), and classifiers add their own
vocabularies (`hap`, `<|HAPPY|>`, `开心/happy`). `normalise_label` maps every known spelling to one
canonical word, leaves an unknown label as its cleaned text (it never invents a value), and
returns None for markers that say "no label" (`unk`, `n/a`, `other`, …).

`resolve_attributes` decides each of gender, emotion, age and accent with the precedence
corpus label > classifier prediction > heuristic (the pitch-based gender already in `Features`)
and records the winner's score and source. The raw corpus labels are not touched here: the
caller keeps them verbatim in the row's `labels`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from schemas.records import Features

__all__ = [
    "ATTRIBUTES",
    "CANONICAL",
    "LABEL_KEYS",
    "SOURCE_BELOW_THRESHOLD",
    "SOURCE_CORPUS",
    "corpus_label",
    "corpus_label_key",
    "is_attribute_label",
    "is_no_label",
    "normalise_label",
    "resolve_attributes",
]

Attribute = Literal["gender", "emotion", "age", "accent"]
ATTRIBUTES: tuple[Attribute, ...] = ("gender", "emotion", "age", "accent")

SOURCE_CORPUS = "corpus"
SOURCE_CLASSIFIER = "classifier"
SOURCE_BELOW_THRESHOLD = "classifier_below_threshold"

# Corpus label keys per attribute, after _key() (lower case, spaces/hyphens -> underscores), in
# order of preference. Common Voice's newer TSVs call the accent column `accents`.
LABEL_KEYS: dict[str, tuple[str, ...]] = {
    "gender": ("gender", "sex"),
    "emotion": ("emotion",),
    "age": ("age",),
    "accent": ("accent", "accents"),
}

# Values that mean "no label" for every attribute (after cleaning).
UNKNOWN_MARKERS: frozenset[str] = frozenset({
    "", "unk", "unknown", "n/a", "na", "none", "null", "nan", "-", "--", "?", "xxx",
    "other", "oth", "others", "not specified", "unspecified", "undefined", "not available",
    "prefer not to say", "do not wish to say", "emo unknown", "no agreement",
})


def _table(groups: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """{canonical: (spellings...)} -> {spelling: canonical}; each canonical also maps to itself."""
    out: dict[str, str] = {}
    for canonical, spellings in groups.items():
        for spelling in (canonical, *spellings):
            if spelling in out and out[spelling] != canonical:
                raise ValueError(f"label {spelling!r} maps to both {out[spelling]!r} and {canonical!r}")
            out[spelling] = canonical
    return out


# Emotion words are adjectives, so a description reads "in an angry tone". Single letters are
# CREMA-D's vote codes (A D F H N S) and SAVEE's prefixes (a d f h n sa su). IEMOCAP's `exc`
# (excited) stays its own word: many papers merge it into happy for 4-class results, but that
# is a modelling choice, not what the annotators said (a classifier's label_map can merge it).
_EMOTION = _table({
    "angry": ("a", "ang", "anger", "angry"),
    "happy": ("h", "hap", "happy", "happiness", "joy", "joyful"),
    "sad": ("s", "sa", "sad", "sadness"),
    "neutral": ("n", "neu", "neutral", "neutrality"),
    "fearful": ("f", "fea", "fear", "fearful", "afraid", "scared"),
    "disgusted": ("d", "dis", "disgust", "disgusted"),
    "surprised": ("su", "sur", "surprise", "surprised", "pleasant surprise", "ps"),
    "calm": ("cal", "calm", "calmness"),
    "excited": ("exc", "excited", "excitement"),
    "frustrated": ("fru", "frustrated", "frustration"),
    "contemptuous": ("con", "contempt", "contemptuous"),
    "bored": ("bor", "bored", "boredom"),
    "sleepy": ("sleepy",),
})

# Common Voice's newer values are `male_masculine` / `female_feminine` (underscores become spaces).
_GENDER = _table({
    "female": ("f", "female", "woman", "w", "women", "fem", "feminine", "girl", "female feminine"),
    "male": ("m", "male", "man", "men", "masc", "masculine", "boy", "male masculine"),
    "non-binary": ("non-binary", "nonbinary", "non binary"),
})

# Common Voice age groups (with its historical misspelling "fourties"), decade words, and the
# coarse groups age classifiers use. Numbers ("23", "23.0", "23 years") stay numbers.
_AGE = _table({
    "child": ("child", "children", "kid", "kids"),
    "teens": ("teens", "teen", "teenager", "teenagers", "adolescent"),
    "twenties": ("twenties", "20s", "20-29"),
    "thirties": ("thirties", "30s", "30-39"),
    "forties": ("forties", "fourties", "40s", "40-49"),
    "fifties": ("fifties", "50s", "50-59"),
    "sixties": ("sixties", "60s", "60-69"),
    "seventies": ("seventies", "70s", "70-79"),
    "eighties": ("eighties", "80s", "80-89"),
    "nineties": ("nineties", "90s", "90-99"),
    "young adult": ("young adult", "young adults"),
    "adult": ("adult", "adults"),
    "middle-aged": ("middle aged", "middle age"),
    "senior": ("senior", "seniors", "elderly", "old", "older adult"),
})

# Accents become the adjective a description uses ("a Scottish speaker"): VCTK (`English`,
# `NorthernIrish`, `SouthAfrican`), Common Voice (old codes `us`, `england`, `newzealand` and
# new phrases like `United States English`), L2-ARCTIC L1s (`Arabic`, `Mandarin`, ...) as is.
_ACCENT = _table({
    "american": ("us", "usa", "u.s.", "america", "american", "united states", "united states english",
                 "american english", "us english", "en-us", "en us", "general american", "general american english"),
    "english": ("england", "english", "england english", "english english", "southern england"),
    "british": ("uk", "british", "british english", "britain", "great britain", "united kingdom", "en-gb",
                "en gb"),
    "scottish": ("scotland", "scottish", "scottish english"),
    "irish": ("ireland", "irish", "irish english"),
    "northern irish": ("northernirish", "northern irish", "northern ireland", "northern irish english"),
    "welsh": ("wales", "welsh", "welsh english"),
    "canadian": ("canada", "canadian", "canadian english", "en-ca"),
    "australian": ("australia", "australian", "australian english", "en-au"),
    "new zealand": ("newzealand", "new zealand", "new zealand english", "nz", "kiwi"),
    "south african": ("southafrican", "south african", "south africa", "southern african",
                      "southern african (south africa, zimbabwe, namibia)"),
    "african": ("african", "africa"),
    "indian": ("india", "indian", "indian english", "india and south asia (india, pakistan, sri lanka)",
               "south asian", "en-in"),
    "filipino": ("philippines", "filipino", "filipino english", "philippine"),
    "singaporean": ("singapore", "singaporean", "singaporean english"),
    "malaysian": ("malaysia", "malaysian", "malaysian english"),
    "hong kong": ("hongkong", "hong kong", "hong kong english"),
    "bermudian": ("bermuda", "bermudian"),
    "west indian": ("west indies and bermuda (bahamas, bermuda, jamaica, trinidad)", "west indies",
                    "west indian", "caribbean"),
    "south atlantic": ("southatlandtic", "southatlantic", "south atlantic"),
})

CANONICAL: dict[str, dict[str, str]] = {
    "gender": _GENDER,
    "emotion": _EMOTION,
    "age": _AGE,
    "accent": _ACCENT,
}

_SPECIAL_TOKEN = re.compile(r"^<\|?\s*(.*?)\s*\|?>$")  # SenseVoice "<|HAPPY|>", "<unk>"
_NUMBER_AGE = re.compile(r"^(\d{1,3})(?:\.0+)?(?:\s*(?:years?|yrs?|y)(?:\s*old)?)?$")
_RANGE_AGE = re.compile(r"^(\d{1,3})\s*(?:-|–|to)\s*(\d{1,3})$")


def _clean(raw: str) -> str:
    """Lower case, special-token brackets off, underscores as spaces, whitespace collapsed."""
    text = str(raw).strip()
    match = _SPECIAL_TOKEN.match(text)
    if match:
        text = match.group(1)
    text = text.replace("_", " ").lower()
    return " ".join(text.split()).strip(" .;:")


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def _lookup(attribute: str, text: str) -> str | None:
    table = CANONICAL[attribute]
    if text in table:
        return table[text]
    if attribute == "age":
        number = _NUMBER_AGE.match(text)
        if number:
            return str(int(number.group(1)))
        span = _RANGE_AGE.match(text)
        if span:
            text = f"{int(span.group(1))}-{int(span.group(2))}"
            return table.get(text, text)
    return None


def normalise_label(attribute: str, raw: str | None) -> str | None:
    """The canonical word for `raw`, its cleaned text when unknown, or None for "no label".

    `attribute` is one of gender, emotion, age, accent (ValueError otherwise). Cleaning lower-
    cases, strips `<|...|>` token brackets and turns underscores into spaces; nothing else is
    guessed. Bilingual labels ("开心/happy") resolve through any part the table knows; Common
    Voice multi-valued accents ("United States English|Southern") normalise part by part.
    """
    if attribute not in CANONICAL:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {sorted(CANONICAL)}")
    if raw is None:
        return None
    text = _clean(raw)
    if text in UNKNOWN_MARKERS:
        return None
    found = _lookup(attribute, text)
    if found is not None:
        return found
    if attribute == "accent" and "|" in text:
        parts = [normalise_label(attribute, part) for part in text.split("|")]
        words = list(dict.fromkeys(p for p in parts if p))
        return ", ".join(words) or None
    if "/" in text and not _RANGE_AGE.match(text):
        for part in text.split("/"):
            part = part.strip()
            if part in UNKNOWN_MARKERS:
                return None
            found = _lookup(attribute, part)
            if found is not None:
                return found
    return text


def is_no_label(raw: object) -> bool:
    """True for a value that says "no label" (`unk`, `n/a`, `other`, blank …), for any label column."""
    return raw is None or _clean(str(raw)) in UNKNOWN_MARKERS


def is_attribute_label(name: str) -> bool:
    """True for a label column that feeds a canonical attribute (gender/sex, emotion, age, accent[s])."""
    key = _key(name)
    return any(key in keys for keys in LABEL_KEYS.values())


def _corpus_match(attribute: str, labels: Mapping[str, str]) -> tuple[str, str] | None:
    """(label column as written, normalised word) of the first column that gives `attribute` a word."""
    by_key: dict[str, tuple[str, str]] = {}
    for key, value in labels.items():
        by_key.setdefault(_key(key), (key, value))
    for key in LABEL_KEYS[attribute]:
        found = by_key.get(key)
        if found is None:
            continue
        word = normalise_label(attribute, str(found[1]))
        if word is not None:
            return found[0], word
    return None


def corpus_label(attribute: str, labels: Mapping[str, str]) -> str | None:
    """Normalised corpus label for `attribute` (keys matched case-insensitively; gender also `sex`)."""
    match = _corpus_match(attribute, labels)
    return match[1] if match else None


def corpus_label_key(attribute: str, labels: Mapping[str, str]) -> str | None:
    """The label column `corpus_label` took `attribute` from (as written in `labels`), for provenance."""
    match = _corpus_match(attribute, labels)
    return match[0] if match else None


def resolve_attributes(
    features: Features,
    labels: Mapping[str, str],
    predictions: Mapping[str, tuple[str, float]],
    min_scores: Mapping[str, float] | Mapping[Attribute, float],
    models: Mapping[str, str] | None = None,
) -> Features:
    """A copy of `features` with gender/emotion/age/accent decided and their score/source set.

    Per attribute, the first that applies wins:
    1. a corpus label (normalised, not an unknown marker): score 1.0, source `corpus`;
    2. a classifier prediction `(label, score)` whose label normalises to a word:
       - score >= min_scores[attribute] (0 when absent): that word, its score, source
         `classifier:<model>` (`models[attribute]`, else the `model` attribute that
         `AttributeClassifier.classify` results carry, else plain `classifier`);
       - below it: the attribute is None (left out of the seed), the score is kept, source
         `classifier_below_threshold:<model>`;
    3. whatever `features` already holds (the pitch heuristic for gender, source
       `pitch_heuristic`), unchanged.
    """
    models = models or {}
    update: dict[str, object] = {}
    for attribute in ATTRIBUTES:
        word = corpus_label(attribute, labels)
        if word is not None:
            update |= {attribute: word, f"{attribute}_score": 1.0, f"{attribute}_source": SOURCE_CORPUS}
            continue
        prediction = predictions.get(attribute)
        if prediction is None:
            continue
        raw, score = prediction
        word = normalise_label(attribute, raw)
        if word is None:
            continue
        model = models.get(attribute) or getattr(prediction, "model", None)
        suffix = f":{model}" if model else ""
        score = float(score)
        if score >= float(min_scores.get(attribute, 0.0)):
            update |= {attribute: word, f"{attribute}_score": score,
                       f"{attribute}_source": SOURCE_CLASSIFIER + suffix}
        else:
            update |= {attribute: None, f"{attribute}_score": score,
                       f"{attribute}_source": SOURCE_BELOW_THRESHOLD + suffix}
    return features.model_copy(update=update)
