"""Rule `contradicts_seed`: the response names what the seed rules out.

- gender: the opposite of the seed's;
- emotion: one neither equal nor compatible with the seed's Emotion (only when the seed has one);
- accent: an accent/nationality adjective the seed lacks or contradicts (a close family member of the
  seed's, "Southern" for "American", is fine);
- age: a number + "year-old", decade words, "teenager", "elderly", … outside the seed's age range, or
  any age when the seed has none.
Judged on the response's own words (quotes and the transcript removed), so quoting "I'm so angry" in a
neutral tone is fine. Known limits (heuristics, tuned for English): a paraphrase of the speech content
("she says her brother is angry") can trip it; words under a negation ("not angry", "without anger")
are skipped; "English" counts as an accent only next to "accent"/"accented". Vocabularies: the lexicon.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tasks.features.labels import normalise_label
from tasks.llm.qc.context import QCContext, QCVerdict, Response, attribute, fail
from tasks.llm.qc.lexicon import GenderWords, lexicon
from tasks.llm.qc.text import Scan, alts, first_words

_LEX = lexicon()

# -- negation ------------------------------------------------------------------------------------

_NEGATION = re.compile(r"\b(?:" + "|".join(_LEX.negations) + r")\b", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[.;:!?,]|\bbut\b|\band\b", re.IGNORECASE)


def _negated(text: str, start: int) -> bool:
    before = text[max(0, start - 80):start]
    parts = _CLAUSE_BREAK.split(before)
    window = " ".join(parts[-1].split()[-5:]) if parts else ""
    return bool(_NEGATION.search(window.replace("’", "'")))


# -- gender --------------------------------------------------------------------------------------

_SPEAK = (r"(?:voice|voices|speaking|speaks|spoke|talking|talks|says|saying|said|speaker|narrat\w*|reading|reads|"
          r"asks|asking|tone|delivery|who)")
_PRONOUN_OBJ = (r"(?:voice|tone|speech|pitch|delivery|accent|words|pace|volume|intonation|emotion|emotions|"
                r"mood|speaking|manner|register|timbre|inflection|cadence|feelings|expression|vocal)")
_PRONOUN_VERB = (r"(?:speaks|says|sounds|talks|seems|appears|expresses|conveys|asks|uses|delivers|said|spoke|"
                 r"sounded|exclaims|states|mentions|(?:is|was)\s+(?:speaking|talking|saying|asking|expressing))")
_SLOT = (r"(?:hear|hears|heard|is|was|sounds? like|voice of|spoken by|said by|read by|features?|featuring|"
         r"contains?|containing|there(?:'s| is))")


def _gender_scan(words: GenderWords) -> Scan:
    adjectives, nouns = "|".join(words.adjectives), "|".join(words.nouns)
    subject, possessive = words.subject, words.possessive
    pattern = re.compile(alts(
        rf"\b(?:{adjectives})\b",
        rf"\b(?:{nouns})(?:'s|’s)?\s+{_SPEAK}\b",
        rf"\b{_SLOT}\s+(?:a|an|the|one)\s+(?:[\w-]+\s+){{0,3}}?(?:{nouns})\b",
        rf"\b{possessive}\s+(?:[\w-]+\s+)?{_PRONOUN_OBJ}\b",
        rf"\b{subject}\s+(?:\w+ly\s+)?{_PRONOUN_VERB}\b",
    ), re.IGNORECASE)
    return Scan(pattern, frozenset([*words.adjectives, *words.nouns, subject, possessive]))


_MALE = _gender_scan(_LEX.gender_words["male"])
_FEMALE = _gender_scan(_LEX.gender_words["female"])


def _gender(prose: str, words: frozenset[str], attrs: Mapping[str, str]) -> str | None:
    """Only the opposite of the seed's gender."""
    gender = normalise_label("gender", attribute(attrs, "gender") or "")
    opposite = {"female": ("male", _MALE), "male": ("female", _FEMALE)}.get(gender or "")
    if opposite:
        for match in opposite[1].finditer(prose, words):
            if not _negated(prose, match.start()):
                return f"says {match.group(0).strip()!r} ({opposite[0]}) but the seed's gender is {gender}"
    return None


# -- emotion -------------------------------------------------------------------------------------

# Response words → canonical emotion (features.labels' vocabulary).
_EMOTION_WORDS = {word: canonical for canonical, words in _LEX.emotion_words.items() for word in words}
_EMOTION_COMPATIBLE: dict[str, set[str]] = {k: set(v) for k, v in _LEX.emotion_compatible.items()}
for _a, _others in list(_EMOTION_COMPATIBLE.items()):  # make the relation symmetric
    for _b in _others:
        _EMOTION_COMPATIBLE.setdefault(_b, set()).add(_a)
_EMOTION_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(_EMOTION_WORDS, key=len, reverse=True))
                         + r")\b(?!\s+(?:to\s+(?:help|assist|describe|provide|answer|explain|share|do|"
                         r"oblige)|accent|pitch|pace|speed|tempo|rate|background|environment|noise|room|"
                         r"acoustics?|setting|recording|volume|level|sound quality|quality)\b)",
                         re.IGNORECASE)
_EMOTION_SCAN = Scan(_EMOTION_RE, first_words(_EMOTION_WORDS))


def _emotion(prose: str, words: frozenset[str], attrs: Mapping[str, str]) -> str | None:
    """Only when the seed names an emotion we know."""
    seed_raw = attribute(attrs, "emotion")
    seed = normalise_label("emotion", seed_raw) if seed_raw else None
    if seed in _EMOTION_COMPATIBLE:
        for match in _EMOTION_SCAN.finditer(prose, words):
            said = _EMOTION_WORDS[match.group(1).lower()]
            if said != seed and said not in _EMOTION_COMPATIBLE[seed] and not _negated(prose, match.start()):
                return f"names emotion {match.group(1)!r} ({said}) but the seed's emotion is {seed}"
    return None


# -- accent --------------------------------------------------------------------------------------

_ACCENT_WORDS = frozenset(_LEX.accent_words)
_ACCENT_LIST = sorted({w.replace("-", " ") for w in _ACCENT_WORDS}, key=len, reverse=True)
_ACCENT_ALT = "|".join(re.escape(w).replace(r"\ ", r"[\s-]") for w in _ACCENT_LIST)
_ACCENT_NOUN = (r"(?:accent|accented|speaker|man|woman|male|female|voice|lady|gentleman|guy|girl|boy|narrator|"
                r"person|pronunciation|intonation)")
_ACCENT_RE = re.compile(alts(
    rf"\b(?P<a>{_ACCENT_ALT})(?:[\s-]english)?[\s-]{_ACCENT_NOUN}\b",
    r"\b(?P<b>english)[\s-](?:accent|accented)\b",
    rf"\baccent\s+(?:that\s+|which\s+)?(?:sounds|seems|is|was)\s+(?:\w+\s+)?(?P<c>{_ACCENT_ALT}|english)\b",
    rf"\baccent\s+(?:from|of)\s+(?:the\s+)?(?P<d>{_ACCENT_ALT})\b",
), re.IGNORECASE)
_ACCENT_SCAN = Scan(_ACCENT_RE, first_words(_ACCENT_LIST) | {"english", "accent"})
_ACCENT_WORD_RE = re.compile(rf"\b(?:{_ACCENT_ALT}|english)\b", re.IGNORECASE)
_ACCENT_FAMILY: dict[str, set[str]] = {k: set(v) for k, v in _LEX.accent_families.items()}
_NATIVE_ENGLISH = frozenset(_LEX.native_english_accents)


def _accent_ok(mention: str, seed_accent: str | None) -> bool:
    mention = " ".join(mention.lower().replace("-", " ").split())
    if seed_accent is None:
        return False
    seed = (normalise_label("accent", seed_accent) or seed_accent).lower()
    seed_words = {" ".join(s.split()) for s in re.split(r"[,|/]", seed) if s.strip()} | {seed}
    if mention in ("foreign", "non native"):
        return not (seed_words & _NATIVE_ENGLISH)
    for s in seed_words:
        if mention == s or re.search(rf"\b{re.escape(mention)}\b", s) or re.search(rf"\b{re.escape(s)}\b", mention):
            return True
        if mention in _ACCENT_FAMILY.get(s, set()) or s in _ACCENT_FAMILY.get(mention, set()):
            return True
    return False


def _accent(prose: str, r: Response, attrs: Mapping[str, str]) -> str | None:
    """Any named accent must be the seed's (or a close family member of it)."""
    seed_accent = attribute(attrs, "accent")
    mentions = [(m.group(m.lastgroup or "a") or "", m.start()) for m in _ACCENT_SCAN.finditer(prose, r.prose_words)]
    for value in _json_values(r.obj, ("accent", "nationality")):
        if not _NEGATION.search(value):
            mentions += [(m.group(0), -1) for m in _ACCENT_WORD_RE.finditer(value)]
    for mention, start in mentions:
        if mention and (start < 0 or not _negated(prose, start)) and not _accent_ok(mention, seed_accent):
            where = f"the seed's accent is {seed_accent}" if seed_accent else "the seed has no accent"
            return f"names accent {mention!r} but {where}"
    return None


# -- age -----------------------------------------------------------------------------------------

_AGE_WORDS: dict[str, tuple[int, int]] = {
    **{word: (d, 19 if word == "teens" else d + 9) for word, d in _LEX.age_decades.items()},
    **_LEX.age_words,
}
_AGE_RE = re.compile(alts(
    r"\b(?P<n>\d{1,3})[\s-](?:years?|yrs?)[\s-]old\b",
    r"\b(?:aged|age of|age)\s*:?\s+(?P<n2>\d{1,3})\b",
    r"\bin\s+(?:his|her|their|the\s+speaker's)\s+(?:early\s+|mid[\s-]?|late\s+)?(?P<dd>[1-9]0)s\b",
    r"\b(?:early\s+|mid[\s-]?|late\s+)?(?P<w>teens|twenties|thirties|forties|fourties|fifties|sixties|seventies|"
    r"eighties|nineties)\b",
    r"\b(?P<t>teenage|teenager|teenagers|adolescent|middle[\s-]aged|elderly|senior citizen|young adult)\b",
    r"\b(?P<c>child(?:'s|’s)? voice|young child|little (?:boy|girl)|a child|small child|kid(?:'s|’s)? voice)\b",
    r"\b(?P<o>old|older|aging|ageing)\s+(?:man|woman|lady|gentleman|speaker|person|voice)\b",
), re.IGNORECASE)
# Every _AGE_RE match holds one of these words, or one starting with "mid" ("midtwenties").
_AGE_SCAN = Scan(_AGE_RE, frozenset(_LEX.age_trigger_words), prefixes=tuple(_LEX.age_trigger_prefixes))


def _age_range(match: re.Match[str]) -> tuple[int, int]:
    groups = match.groupdict()
    if groups.get("n") or groups.get("n2"):
        n = int(groups.get("n") or groups["n2"])
        return n, n
    if groups.get("dd"):
        d = int(groups["dd"])
        return d, d + 9
    if groups.get("w"):
        word = groups["w"].lower().replace("fourties", "forties")
        return _AGE_WORDS[word]
    if groups.get("t"):
        word = " ".join(groups["t"].lower().replace("-", " ").split())
        word = {"teenager": "teen", "teenagers": "teen", "senior citizen": "senior",
                "middle aged": "middle-aged"}.get(word, word)
        return _AGE_WORDS[word]
    if groups.get("c"):
        return _AGE_WORDS["child"]
    return _AGE_WORDS["older adult"]


def _seed_age_range(value: str) -> tuple[int, int] | None:
    word = normalise_label("age", value)
    if word is None:
        return None
    if word.isdigit():
        return int(word), int(word)
    span = re.fullmatch(r"(\d{1,3})-(\d{1,3})", word)
    if span:
        return int(span.group(1)), int(span.group(2))
    return _AGE_WORDS.get(word)


def _age(prose: str, r: Response, attrs: Mapping[str, str]) -> str | None:
    """Any age mention must overlap the seed's age range."""
    seed_raw = attribute(attrs, "age")
    seed = _seed_age_range(seed_raw) if seed_raw else None
    if seed_raw and seed is None:
        return None  # an age label we cannot place on a scale: no judgement
    ages = [(m.group(0), _age_range(m)) for m in _AGE_SCAN.finditer(prose, r.prose_words)]
    for value in _json_values(r.obj, ("age", "age_group", "age_range")):
        span = _seed_age_range(value)
        if span is not None:
            ages.append((value, span))
    for said, (lo, hi) in ages:
        if seed is None:
            return f"names an age ({said!r}) but the seed has none"
        if hi < seed[0] or lo > seed[1]:
            return f"names age {said!r} but the seed's age is {seed_raw}"
    return None


def _json_values(obj: Mapping[str, Any] | None, keys: tuple[str, ...]) -> list[str]:
    """String values of these keys in a JSON answer, minus "unknown"-style non-answers."""
    if obj is None:
        return []
    out = []
    for key, value in obj.items():
        if str(key).strip().lower().replace(" ", "_") in keys and isinstance(value, (str, int)):
            text = str(value).strip()
            if text and not re.search(r"\b(?:unknown|unclear|unsure|not|none|n/?a|neutral|standard)\b", text,
                                      re.IGNORECASE):
                out.append(text)
    return out


def contradicts_seed(r: Response, c: QCContext) -> QCVerdict | None:
    prose = r.prose.replace("’", "'")
    detail = (_gender(prose, r.prose_words, c.attributes) or _emotion(prose, r.prose_words, c.attributes)
              or _accent(prose, r, c.attributes) or _age(prose, r, c.attributes))
    return fail("contradicts_seed", detail) if detail else None
