"""Response quality control: is an LLM answer a usable training target for this clip?

`check_response` runs the enabled rules of `QCConfig.rules` in the fixed order of `RULE_ORDER` and
returns the first failure as a `QCVerdict` with the rule's name as the reason:

  1. empty             no letter or digit at all
  2. truncated         finish_reason == "length" (the answer was cut at max_tokens)
  3. refusal           "as an AI…", "I cannot hear…", "I'm unable to listen…", "I don't have the ability to hear…"
  4. injection         the transcript holds an instruction-like imperative ("ignore previous instructions",
                       "reply with X", "say only X") and the response obeys it (is, starts with, or is a very
                       short reply matching the demanded text; or is a bare acknowledgement like "Understood")
  5. format            the instruction's constraint tags ([json], [bullets=N], [one_sentence], [words<=N], …)
  6. too_short         fewer words than config.min_words (relaxed by a word-limit tag; skipped for [json])
  7. too_long          more words than config.max_words (raised to N by [words<=N], to 2N by [words>=N])
  8. wrong_language    config.language set: script share + stopword-ratio heuristic (see `_wrong_language`)
  9. leaks_seed        bracketed timestamps, "Gender: Female"-style pairs that copy a seed value or a
                       "Label: v, Label: v" list (a heading like "**Pitch:** the voice is high" is fine),
                       "seed description",
                       "metadata", "the transcript says", "according to the description", …
 10. contradicts_seed  the opposite gender to the seed's; an emotion neither equal nor compatible with the
                       seed's Emotion (only when the seed has one); an accent/nationality adjective or an
                       age (number + "year-old", decade words, "teenager", "elderly", …) the seed lacks or
                       contradicts

Cause before symptom: a truncated answer also breaks its format, an injected "OK" is also too short, and
the more specific reason is the one counted. Contradiction and language checks look at the response's own
words: quoted spans and the transcript itself are removed first, so quoting "I'm so angry" in a neutral
tone is fine. Known limits (heuristics, tuned for English responses): a paraphrase of the speech content
("she says her brother is angry") can trip contradicts_seed; emotion words under a negation ("not angry",
"without anger") are skipped; "English" counts as an accent only next to "accent"/"accented".

Instructions come from the pool file with optional constraint tags at the start of the line (grammar in
tasks/resources/instructions_v1.txt); `parse_instruction` strips them, and only `Instruction.text` is
sent to the LLM.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, get_args

from schemas.attributes import ATTRIBUTE_LABELS
from schemas.config import QCConfig, QCRule
from tasks.features.labels import normalise_label

__all__ = [
    "BUILTIN_POOL",
    "RULE_ORDER",
    "Constraint",
    "Instruction",
    "QCVerdict",
    "builtin_pool_path",
    "check_response",
    "count_words",
    "parse_instruction",
    "parse_pool",
    "seed_attributes",
]

RULE_ORDER: tuple[QCRule, ...] = ("empty", "truncated", "refusal", "injection", "format", "too_short",
                                  "too_long", "wrong_language", "leaks_seed", "contradicts_seed")
assert sorted(RULE_ORDER) == sorted(get_args(QCRule)), "RULE_ORDER must name every QC rule once"

BUILTIN_POOL = "instructions_v1.txt"


def builtin_pool_path(name: str = BUILTIN_POOL) -> str:
    """Filesystem path of a pool shipped in tasks/resources (for describe.instruction_pool)."""
    return str(resources.files("tasks.resources").joinpath(name))


# ------------------------------------------------------------------------------------------------
# Instructions and their constraint tags
# ------------------------------------------------------------------------------------------------

ConstraintKind = Literal["json", "bullets", "sentences", "words"]
_COUNT_KINDS = ("bullets", "sentences", "words")


@dataclass(frozen=True)
class Constraint:
    """One machine-checkable constraint. Counts are inclusive bounds; None = unbounded."""

    kind: ConstraintKind
    lo: int | None = None
    hi: int | None = None
    keys: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        if self.kind == "json":
            return f"[json={','.join(self.keys)}]" if self.keys else "[json]"
        if self.lo is not None and self.lo == self.hi:
            return f"[{self.kind}={self.lo}]"
        if self.lo is not None and self.hi is not None:
            return f"[{self.kind}={self.lo}-{self.hi}]"
        if self.hi is not None:
            return f"[{self.kind}<={self.hi}]"
        return f"[{self.kind}>={self.lo}]"

    def allows(self, n: int) -> bool:
        return (self.lo is None or n >= self.lo) and (self.hi is None or n <= self.hi)

    def bounds_text(self) -> str:
        if self.lo is not None and self.lo == self.hi:
            return f"exactly {self.lo}"
        if self.lo is not None and self.hi is not None:
            return f"{self.lo} to {self.hi}"
        return f"at most {self.hi}" if self.hi is not None else f"at least {self.lo}"


@dataclass(frozen=True)
class Instruction:
    """An instruction as sent to the LLM (`text`, tags stripped) and the constraints QC checks."""

    text: str
    constraints: tuple[Constraint, ...] = ()
    tags: str = ""

    @property
    def line(self) -> str:
        """The pool line this came from (tags + text)."""
        return f"{self.tags} {self.text}" if self.tags else self.text

    def constraint(self, kind: ConstraintKind) -> Constraint | None:
        return next((c for c in self.constraints if c.kind == kind), None)


_TAG = re.compile(r"\[\s*([a-z_]+)\s*(?:(<=|>=|=)\s*([^\]]*?))?\s*\]")
_TAG_PREFIX = re.compile(r"^\s*((?:\[\s*[a-z_]+\s*(?:(?:<=|>=|=)[^\]]*)?\]\s*)+)(.*)$", re.DOTALL)


def _int(value: str, tag: str) -> int:
    if not re.fullmatch(r"\d{1,5}", value.strip()):
        raise ValueError(f"instruction tag {tag}: expected a whole number, got {value!r}")
    return int(value)


def _parse_tag(name: str, op: str | None, value: str | None, tag: str) -> Constraint:
    if name == "json":
        if op is None:
            return Constraint("json")
        keys = tuple(k.strip() for k in (value or "").split(",") if k.strip())
        if op != "=" or not keys or any(not re.fullmatch(r"[A-Za-z_][\w-]*", k) for k in keys):
            raise ValueError(f"instruction tag {tag}: use [json] or [json=key1,key2]")
        return Constraint("json", keys=keys)
    if name == "one_sentence":
        if op is not None:
            raise ValueError(f"instruction tag {tag}: [one_sentence] takes no value")
        return Constraint("sentences", 1, 1)
    if name in _COUNT_KINDS:
        kind: ConstraintKind = name  # type: ignore[assignment]
        if op is None or value is None or not value.strip():
            raise ValueError(f"instruction tag {tag}: needs a count, e.g. [{name}=3] or [{name}<=3]")
        if op == "=" and "-" in value:
            low, _, high = value.partition("-")
            lo, hi = _int(low, tag), _int(high, tag)
            if lo > hi:
                raise ValueError(f"instruction tag {tag}: range {lo}-{hi} is empty")
            return Constraint(kind, lo, hi)
        n = _int(value, tag)
        if op == "=":
            return Constraint(kind, n, n)
        return Constraint(kind, None, n) if op == "<=" else Constraint(kind, n, None)
    raise ValueError(f"instruction tag {tag}: unknown tag {name!r}; known: json, bullets, sentences, "
                     "one_sentence, words")


def parse_instruction(line: str) -> Instruction:
    """`"[bullets=3][words<=60] Describe…"` → Instruction("Describe…", (bullets 3, words ≤ 60), tags).

    A line that does not start with a tag is a plain instruction without constraints (DeSTA2's
    fixed instruction, or a config's `describe.instruction`). Unknown or malformed tags raise
    ValueError, so a bad pool fails at load time, not halfway through a corpus.
    """
    text = " ".join(str(line).split())
    match = _TAG_PREFIX.match(text)
    if not match:
        return Instruction(text=text)
    tags_text, rest = match.group(1), match.group(2).strip()
    constraints: list[Constraint] = []
    for tag in _TAG.finditer(tags_text):
        c = _parse_tag(tag.group(1), tag.group(2), tag.group(3), tag.group(0))
        if any(prev.kind == c.kind for prev in constraints):
            raise ValueError(f"instruction {text!r}: more than one {c.kind} tag")
        constraints.append(c)
    if not rest:
        raise ValueError(f"instruction {text!r}: tags but no instruction text")
    return Instruction(text=rest, constraints=tuple(constraints), tags="".join(c.tag for c in constraints))


def parse_pool(lines: Iterable[str]) -> tuple[Instruction, ...]:
    """Every instruction of a pool (comments/blank lines skipped); all tag errors reported at once."""
    out: list[Instruction] = []
    errors: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            out.append(parse_instruction(line))
        except ValueError as exc:
            errors.append(f"line {n}: {exc}")
    if errors:
        raise ValueError("instruction pool has bad tags:\n" + "\n".join(errors))
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Verdict
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QCVerdict:
    ok: bool
    reason: QCRule | None = None
    detail: str = ""


PASS = QCVerdict(ok=True)

_WORD_TOKEN = re.compile(r"\S+")
_HAS_ALNUM = re.compile(r"[^\W_]")
_ALNUM_TOKEN = re.compile(r"\S*[^\W_]\S*")  # a whitespace-separated token holding a letter or digit


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def count_words(text: str) -> int:
    """Whitespace-separated tokens holding a letter or digit (bullet dashes don't count); in scripts
    written without spaces (Han, Kana) each character counts as a word."""
    if not _CJK.search(text):
        return len(_ALNUM_TOKEN.findall(text))
    n = 0
    for tok in _WORD_TOKEN.findall(text):
        cjk = len(_CJK.findall(tok))
        n += cjk + (1 if _HAS_ALNUM.search(_CJK.sub("", tok) if cjk else tok) else 0)
    return n


def _norm(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: for comparing short strings."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())

def _alts(*patterns: str) -> str:
    """Regex alternation of the patterns (each may be split over several string literals)."""
    return "|".join(patterns)


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_WORD = re.compile(r"[^\W_]+")


def words_of(text: str) -> frozenset[str]:
    """The lower-cased runs of letters and digits in `text`: what a scan's trigger words are looked up in."""
    return frozenset(_WORD.findall(text.lower()))


def _first_words(phrases: Iterable[str]) -> frozenset[str]:
    """The first word of each phrase ("matter-of-fact" → "matter", "new zealand" → "new")."""
    return frozenset(m.group(0) for p in phrases if (m := _WORD.search(p.lower())))


@dataclass(frozen=True)
class _Scan:
    """A costly regex (large case-insensitive alternations: ~60–270 µs per answer) run only when the
    answer holds a word that every match of it must contain (`triggers`, or a word starting with one
    of `prefixes`): a set lookup is ~50× cheaper, and most answers name no age, accent or emotion.
    tests/test_qc.py checks the triggers against every pattern's matches."""

    pattern: re.Pattern[str]
    triggers: frozenset[str]
    prefixes: tuple[str, ...] = ()

    def may_match(self, words: frozenset[str]) -> bool:
        return not words.isdisjoint(self.triggers) or bool(self.prefixes) and \
            any(w.startswith(self.prefixes) for w in words)

    def finditer(self, text: str, words: frozenset[str]) -> Iterable[re.Match[str]]:
        return self.pattern.finditer(text) if self.may_match(words) else ()



# ------------------------------------------------------------------------------------------------
# Seed attributes
# ------------------------------------------------------------------------------------------------

_SEED_ATTRS = re.compile(r"\(([^()]*:[^()]*)\)\s*$")


def seed_attributes(seed_description: str) -> dict[str, str]:
    """`"[00:00-00:05] hi (Gender: Female, Accent: american, southern)"` → {"Gender": "Female", "Accent": …}."""
    match = _SEED_ATTRS.search(seed_description.strip())
    if not match:
        return {}
    out: dict[str, str] = {}
    last: str | None = None
    for part in match.group(1).split(","):
        label, sep, value = part.partition(":")
        if sep and label.strip():
            last = label.strip()
            out[last] = value.strip()
        elif last is not None:  # a comma inside a value ("american, southern")
            out[last] = f"{out[last]}, {part.strip()}"
    return out


def _attr(attributes: Mapping[str, str], label: str) -> str | None:
    for key, value in attributes.items():
        if key.strip().lower() == label and value and str(value).strip():
            return str(value).strip()
    return None


# ------------------------------------------------------------------------------------------------
# The response as prose: quotes and the transcript removed
# ------------------------------------------------------------------------------------------------

_QUOTED = re.compile(r'"[^"\n]*"|“[^”]*”|«[^»]*»|„[^“”]*[“”]|「[^」]*」|(?<![\w\'])\'[^\'\n]{2,}?\'(?!\w)')


@functools.lru_cache(maxsize=4096)  # a request and its regenerations share a transcript
def _transcript_pattern(transcript: str | None) -> re.Pattern[str] | None:
    words = re.findall(r"[^\W_]+(?:['’][^\W_]+)*", transcript or "")
    if not words:
        return None
    return re.compile(r"[\W_]*".join(re.escape(w) for w in words), re.IGNORECASE)


def _prose(text: str, transcript: str | None, placeholder: str = " ") -> str:
    pattern = _transcript_pattern(transcript)
    if pattern is not None:
        text = pattern.sub(placeholder, text)
    return _QUOTED.sub(placeholder, text)


def _json_object(text: str) -> dict[str, Any] | None:
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _json_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _json_strings(v)]
    return []


@dataclass
class _Ctx:
    response: str
    seed: str
    attributes: Mapping[str, str]
    transcript: str | None
    instruction: Instruction
    finish_reason: str | None
    config: QCConfig
    text: str = ""
    obj: dict[str, Any] | None = None
    prose: str = ""
    words: int = 0
    prose_words: frozenset[str] = frozenset()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.text = self.response.strip()
        self.obj = _json_object(self.text)
        source = ". ".join(_json_strings(self.obj)) if self.obj is not None else self.text
        # JSON values are already strings: only the transcript is removed from them, not quotes.
        self.prose = _prose(source, self.transcript) if self.obj is None else \
            _prose(source, self.transcript).replace('"', " ")
        self.words = count_words(self.text)
        self.prose_words = words_of(self.prose)


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------


def _empty(c: _Ctx) -> str | None:
    return None if _HAS_ALNUM.search(c.text) else "no words in the response"


def _truncated(c: _Ctx) -> str | None:
    return "finish_reason is 'length' (cut at max_tokens)" if (c.finish_reason or "").lower() == "length" else None


_REFUSAL = re.compile(_alts(
    r"\bas an? (?:ai|artificial intelligence|language model|text[- ]based|large language model|llm|assistant)\b",
    r"\bi(?:'m| am) (?:just |only )?an? (?:ai|language model|text[- ]based)",
    r"\bi(?: can ?not| can't| cannot| am unable to|'m unable to| am not able to|'m not able to| do not| don't) "
    r"(?:actually |directly |physically )?(?:hear|listen|play|process|access|perceive|analy[sz]e)"
    r"(?! (?:a|an|the) (?:hint|trace|sign|note|touch|bit|degree)\b)",
    r"\bi (?:do not|don't) have (?:the )?(?:ability|capability|capacity|access|means) to "
    r"(?:hear|listen|play|process|access|perceive|analy[sz]e)",
    r"\bi (?:do not|don't) have (?:access to|any) (?:the |this |an |any )?(?:audio|sound|recording|clip|file)",
    r"\b(?:there is|there's|i see) no (?:audio|sound|recording|clip|file) (?:attached|provided|shared|included)",
    r"\bno (?:audio|sound|recording|clip|file) (?:was|has been|is) (?:attached|provided|shared|included)",
    r"\byou (?:haven't|have not|didn't|did not) (?:provide|provided|share|shared|attach|attached|upload|uploaded)",
    r"\bwithout (?:access to|hearing|listening to) the (?:actual )?(?:audio|recording|clip|sound)",
    r"\bi(?:'m| am) sorry,? but\b",
    r"\bi apologi[sz]e,? but\b",
    r"\bunfortunately,? i(?: can ?not| can't| cannot| am unable|'m unable| am not able|'m not able| don't| do not)\b",
    r"\bi (?:can ?not|can't|cannot|won't|will not) (?:help|assist|comply) with\b",
), re.IGNORECASE)


def _refusal(c: _Ctx) -> str | None:
    match = _REFUSAL.search(c.text.replace("’", "'"))
    return f"refusal phrase {match.group(0)!r}" if match else None


# -- injection -------------------------------------------------------------------------------------

_VERB = r"(?:reply|respond|answer|output|print|return|write|type|say|repeat|state)"
_INJECTION_MARKERS = re.compile(_alts(
    r"\b(?:ignore|disregard|forget|override|skip|bypass)\b(?:\s+\w+){0,3}?\s+"
    r"(?:instructions?|prompts?|rules|directions|context|guidelines|everything|above|previous)\b",
    r"\b(?:reply|respond|answer)\s+(?:only\s+|just\s+|simply\s+)?with\b",
    r"\b(?:say|output|print|write|type|return|state)\s+(?:only|just|exactly|simply|nothing but)\b",
    r"\b(?:only|just|simply)\s+" + _VERB + r"\b",
    r"\brepeat after me\b",
    r"\byour\s+(?:only\s+)?(?:answer|response|reply|output)\s+(?:must|should|will|has to)\s+be\b",
    r"\b(?:you are now|from now on|new instructions?|system prompt|act as|pretend (?:to be|you are))\b",
), re.IGNORECASE)
_IGNORE_MARKER = re.compile(r"\b(?:ignore|disregard|forget|override|bypass)\b", re.IGNORECASE)
_DEMAND_END = r"(?=\s*(?:$|[.!?,;\n]|\s(?:and|then|now|please|to\s+(?:me|us|this|the|everything))\b))"
_DEMANDS = [
    re.compile(r"\b" + _VERB + r"\s+(?:back\s+)?(?:only\s+|just\s+|exactly\s+|simply\s+|nothing but\s+)?"
               r"(?:with\s+)?(?:only\s+|just\s+)?(?:the\s+(?:single\s+)?(?:word|words|phrase|text|string|"
               r"letters?|token)\s+)?[:\-]?\s*[\"“'`]?(?P<d>[^\"”'`.!?,;:\n]{1,80}?)[\"”'`]?" + _DEMAND_END,
               re.IGNORECASE),
    re.compile(r"\brepeat after me\s*[:,\-]?\s*[\"“'`]?(?P<d>[^\"”'`.!?;\n]{1,80}?)[\"”'`]?" + _DEMAND_END,
               re.IGNORECASE),
    re.compile(r"\b(?:answer|response|reply|output)\s+(?:must|should|will|has to)\s+be\s*[:\-]?\s*[\"“'`]?"
               r"(?P<d>[^\"”'`.!?,;:\n]{1,80}?)[\"”'`]?" + _DEMAND_END, re.IGNORECASE),
]
_NOT_DEMANDS = {"", "me", "it", "this", "that", "the", "a", "an", "to", "something", "anything", "everything",
                "your", "yes or no"}
_ACKNOWLEDGE = re.compile(r"^\W*(?:understood|acknowledged|as you wish|will do|roger|affirmative|"
                          r"ok(?:ay)?,? (?:ignoring|understood))\b", re.IGNORECASE)


def injection_demands(transcript: str | None) -> list[str]:
    """The texts an instruction-like transcript demands as the reply (normalised), [] if none."""
    if not transcript or not _INJECTION_MARKERS.search(transcript):
        return []
    demands: list[str] = []
    for pattern in _DEMANDS:
        for match in pattern.finditer(transcript):
            demand = _norm(match.group("d"))
            if demand not in _NOT_DEMANDS and not demand.startswith(("with ", "your ")):
                demands.append(demand)
    return list(dict.fromkeys(demands))


def _injection(c: _Ctx) -> str | None:
    if not c.transcript or not _INJECTION_MARKERS.search(c.transcript):
        return None
    resp = _norm(c.text)
    resp_tokens = resp.split()
    for demand in injection_demands(c.transcript):
        if resp == demand or resp.startswith(demand + " "):
            return f"response obeys the transcript's demand {demand!r}"
        if len(resp_tokens) <= 3 and set(demand.split()) & set(resp_tokens):
            return f"very short response matching the transcript's demand {demand!r}"
    if _ACKNOWLEDGE.search(c.text):
        return "response acknowledges an instruction found in the transcript"
    short_ok = any(k.kind == "words" and k.hi is not None and k.hi <= 3 for k in c.instruction.constraints)
    if _IGNORE_MARKER.search(c.transcript) and len(resp_tokens) <= 2 and not short_ok and c.obj is None:
        return "a one- or two-word reply to a transcript that tries to override the instructions"
    return None


# -- format ----------------------------------------------------------------------------------------

_BULLET = re.compile(r"^\s*(?:[-*•‣▪◦–—+]|\d{1,2}[.)])\s+\S")
_ABBREVIATIONS = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|approx|e\.g|i\.e|a\.m|p\.m|No)\.", re.IGNORECASE)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n+")


def count_sentences(text: str, transcript: str | None = None) -> int:
    """Sentences outside quoted speech; a line break always ends a sentence."""
    body = _prose(text, transcript, placeholder=" QUOTE ")
    body = _ABBREVIATIONS.sub(lambda m: m.group(0).replace(".", ""), body)
    return sum(1 for part in _SENTENCE_SPLIT.split(body.strip()) if _HAS_ALNUM.search(part))


def _check_constraint(c: _Ctx, k: Constraint) -> str | None:
    if k.kind == "json":
        if c.obj is None:
            return "response is not a single JSON object"
        have = {str(key).strip().lower() for key in c.obj}
        missing = [key for key in k.keys if key.lower() not in have]
        return f"JSON object lacks key(s) {missing}" if missing else None
    if k.kind == "bullets":
        lines = [line for line in c.text.splitlines() if line.strip()]
        bullets = sum(1 for line in lines if _BULLET.match(line))
        if bullets != len(lines):
            return f"{len(lines) - bullets} non-bullet line(s) next to {bullets} bullet(s)"
        return None if k.allows(bullets) else f"{bullets} bullet(s), instruction asks for {k.bounds_text()}"
    if k.kind == "sentences":
        n = count_sentences(c.text, c.transcript)
        return None if k.allows(n) else f"{n} sentence(s), instruction asks for {k.bounds_text()}"
    n = c.words
    return None if k.allows(n) else f"{n} word(s), instruction asks for {k.bounds_text()}"


def _format(c: _Ctx) -> str | None:
    for k in c.instruction.constraints:
        problem = _check_constraint(c, k)
        if problem:
            return f"{k.tag}: {problem}"
    return None


# -- length ----------------------------------------------------------------------------------------


def _too_short(c: _Ctx) -> str | None:
    if c.instruction.constraint("json") is not None:
        return None
    limit = c.config.min_words
    words = c.instruction.constraint("words")
    if words is not None:
        limit = min(limit, words.lo if words.lo is not None else 1, words.hi if words.hi is not None else limit)
    return f"{c.words} word(s) < minimum {limit}" if c.words < limit else None


def _too_long(c: _Ctx) -> str | None:
    limit = c.config.max_words
    words = c.instruction.constraint("words")
    if words is not None:  # the tag's own bound governs; [words>=N] alone allows up to 2N
        limit = max(limit, words.hi if words.hi is not None else 2 * (words.lo or 0))
    return f"{c.words} word(s) > maximum {limit}" if c.words > limit else None


# -- language --------------------------------------------------------------------------------------

_STOPWORDS: dict[str, frozenset[str]] = {
    "en": _wordset("""the a an and or but of to in on at by for with from into is are was were be been being it
        its this that these those as has have had not no which who whom what when where while their his her
        she he they them i you we our your can could would should will there than then so very also just
        some any about speaker speakers voice tone sounds sound clip audio recording speaks says speaking"""),
    "es": _wordset("""el la los las de del que y en un una es con por para se su sus al lo como más pero le ya
        o este esta hay muy también son fue voz habla hablante grabación"""),
    "fr": _wordset("""le la les de des du et est un une en que qui dans pour pas il elle au aux avec sur ce
        cette son sa ses sont très aussi mais voix parle locuteur enregistrement"""),
    "de": _wordset("""der die das und ist nicht ein eine einen mit zu den von sie es ich auf im dem des sich
        auch wird sind sehr aber oder stimme spricht sprecher aufnahme"""),
    "it": _wordset("""il lo la gli le di che e è un una per con non sono del della nel nella anche molto ma
        voce parla registrazione"""),
    "pt": _wordset("""o a os as de do da dos das que e é um uma em com não para por se na no mais muito mas
        voz fala gravação"""),
    "nl": _wordset("""de het een en van is dat niet met op zijn voor ook maar er wordt heel stem spreekt
        opname"""),
}
_LATIN_LANGUAGES = _wordset("""en es fr de it pt nl sv da no nb nn fi pl cs sk sl hr bs ro hu tr az id ms vi
    ca eu gl et lv lt sq sw tl af ga cy is mt""")
_SCRIPTS: dict[str, tuple[str, ...]] = {
    "zh": ("CJK",), "yue": ("CJK",), "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": ("HANGUL", "CJK"),
    "ru": ("CYRILLIC",), "uk": ("CYRILLIC",), "bg": ("CYRILLIC",), "sr": ("CYRILLIC", "LATIN"),
    "be": ("CYRILLIC",), "kk": ("CYRILLIC",), "mk": ("CYRILLIC",), "ar": ("ARABIC",), "fa": ("ARABIC",),
    "ur": ("ARABIC",), "hi": ("DEVANAGARI",), "mr": ("DEVANAGARI",), "ne": ("DEVANAGARI",), "el": ("GREEK",),
    "he": ("HEBREW",), "th": ("THAI",), "bn": ("BENGALI",), "ta": ("TAMIL",), "ka": ("GEORGIAN",),
    "hy": ("ARMENIAN",),
}
_LETTERS = re.compile(r"[^\W\d_]+")
_NOT_LETTERS = re.compile(r"[\W\d_]+")


@functools.lru_cache(maxsize=8192)
def _script(ch: str) -> str:
    """The Unicode script of a letter. Called for every letter of every response: ASCII letters
    answer at once and the rest are remembered (unicodedata.name was a third of QC's CPU)."""
    if ch.isascii() and ch.isalpha():
        return "LATIN"
    try:
        return unicodedata.name(ch).split(" ")[0]
    except ValueError:
        return "UNKNOWN"


def _wrong_language(c: _Ctx) -> str | None:
    """Cheap heuristic, not a language identifier.

    1. Script: for a language with a known script (Latin for en/es/fr/…, Han for zh, Cyrillic for
       ru, …), fewer than half of the letters in that script (with ≥ 10 letters) fails.
    2. Stopwords (en es fr de it pt nl): with ≥ 6 words, another language's stopword share ≥ 0.2
       and above the expected one's fails; with ≥ 12 words, an expected share < 0.05 fails.
    Judged on the response's own words (quotes, transcript and JSON keys removed). Limits: short
    answers pass; languages without a list get only the script check; unknown codes pass;
    mixed-language answers pass when the expected language's function words dominate.
    """
    language = (c.config.language or "").split("-")[0].split("_")[0].lower()
    if not language:
        return None
    # ASCII: the letters are what the regex leaves (one C pass); else exactly what isalpha() says.
    ascii_prose = c.prose.isascii()
    letters = _NOT_LETTERS.sub("", c.prose) if ascii_prose else [ch for ch in c.prose if ch.isalpha()]
    scripts = ("LATIN",) if language in _LATIN_LANGUAGES else _SCRIPTS.get(language)
    if scripts and len(letters) >= 10:
        ascii_latin = "LATIN" in scripts and ascii_prose  # every ASCII letter is Latin
        share = 1.0 if ascii_latin else sum(1 for ch in letters if _script(ch) in scripts) / len(letters)
        if share < 0.5:
            return f"only {share:.0%} of letters are in the script of {language!r}"
    expected = _STOPWORDS.get(language)
    tokens = [t.lower() for t in _LETTERS.findall(c.prose)]
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


# -- leaks -----------------------------------------------------------------------------------------

_TIME = r"\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?"
_TIMESTAMP = re.compile(r"[\[(]\s*" + _TIME + r"\s*(?:-|–|—|to)\s*" + _TIME + r"\s*[\])]|"
                        r"\b\d{2}:\d{2}(?::\d{2})?\s*(?:-|–|—)\s*\d{2}:\d{2}(?::\d{2})?\b")
_LEAK_PHRASES = re.compile(_alts(
    r"\bseed (?:description|transcript|text)\b", r"\bmeta-?data\b",
    r"\btranscript(?:ion)? (?:says|said|reads|states|shows|indicates|provided|given|mentions|above)\b",
    r"\b(?:the|this) (?:provided|given|supplied|above) (?:description|transcript|labels?|annotations?|"
    r"information|text|details|attributes)\b",
    r"\baccording to the (?:description|labels?|annotations?|transcript|text|metadata|attributes|information)\b",
    r"\b(?:based on|from) the (?:description|labels?|annotations?|attributes)\b",
    r"\bthe (?:description|labels?|annotations?|attributes) (?:say|says|said|states?|indicates?|mentions?|"
    r"lists?|shows?|suggests?|provided|given)\b",
    r"\b(?:labell?ed|tagged|annotated) as\b", r"\bthe first line\b",
), re.IGNORECASE)
_LABELS = sorted({*ATTRIBUTE_LABELS.values(), "Speed", "Noise", "SNR", "C50"}, key=len, reverse=True)
_LABEL_ALT = "|".join(re.escape(label) for label in _LABELS)
_LABEL_PAIR = re.compile(r"(?:^|(?<=[\s(,;*•\-]))(" + _LABEL_ALT + r")\s*\**\s*:\s*\**\s*[\"'“]?([^\n,;.()\"”]{0,60})",
                         re.IGNORECASE | re.MULTILINE)
_LABEL_LIST = re.compile(r"\b(?:" + _LABEL_ALT + r")\s*:\s*[^,;\n:]{1,40}[,;]\s*(?:" + _LABEL_ALT + r")\s*:",
                         re.IGNORECASE)
_LABEL_ALIASES = {"speed": "speaking speed", "noise": "noise level"}
_CANONICAL_LABELS = {"gender": "gender", "emotion": "emotion", "age": "age", "accent": "accent"}


def _copies_seed_value(label: str, said: str, attributes: Mapping[str, str]) -> bool:
    """Does "Label: said" repeat the seed's value for that label ("Gender: female", "Pitch: High")?"""
    key = label.strip().lower()
    value = _attr(attributes, _LABEL_ALIASES.get(key, key))
    said_n, value_n = _norm(said), _norm(value or "")
    if not value_n or not said_n:
        return False
    if said_n == value_n or said_n.startswith(value_n + " "):
        return True
    attribute = _CANONICAL_LABELS.get(key)
    if attribute is None:
        return False
    first = said_n.split()[0]
    return normalise_label(attribute, first) == normalise_label(attribute, value_n)


def _leaks_seed(c: _Ctx) -> str | None:
    colon = ":" in c.prose  # a timestamp and a "Label: value" both hold one: skip their scans without
    match = _TIMESTAMP.search(c.prose) if colon else None
    if match:
        return f"timestamp span {match.group(0)!r} from the seed format"
    if c.obj is None and colon:
        listed = _LABEL_LIST.search(c.prose)
        if listed:
            return f"seed-style 'Label: value, Label: …' list ({listed.group(0)!r})"
        for pair in _LABEL_PAIR.finditer(c.prose):
            if _copies_seed_value(pair.group(1), pair.group(2), c.attributes):
                return f"seed-style pair {pair.group(1)}: {pair.group(2).strip()!r} copies the seed"
    match = _LEAK_PHRASES.search(c.prose)
    if match:
        return f"mentions the seed/metadata ({match.group(0)!r})"
    return None


# -- contradictions --------------------------------------------------------------------------------

def _lexicon(groups: Mapping[str, str]) -> dict[str, str]:
    return {word: canonical for canonical, words in groups.items() for word in words.split()}


# Response words → canonical emotion (features.labels' vocabulary). Not listed on purpose: "content",
# "down", "flat", "pleased", "glad", "mad", "composed" (too often not about emotion).
_EMOTION_WORDS = _lexicon({
    "angry": "angry angrily anger furious furiously irritated irritation annoyed annoyance irate enraged rage "
             "hostile indignant",
    "happy": "happy happily happiness joy joyful joyfully joyous cheerful cheerfully delighted elated gleeful "
             "jubilant upbeat merry",
    "sad": "sad sadly sadness sorrowful sorrow melancholy melancholic gloomy unhappy depressed mournful "
           "tearful downcast dejected heartbroken despondent grief grieving",
    "neutral": "neutral neutrally emotionless unemotional matter-of-fact impassive",
    "fearful": "fearful fear afraid scared frightened terrified anxious anxiously nervous nervously panicked "
               "panicky worried uneasy apprehensive",
    "disgusted": "disgusted disgust revulsion repulsed revolted",
    "surprised": "surprised surprise astonished astonishment amazed amazement shocked startled stunned "
                 "incredulous",
    "calm": "calm calmly relaxed serene tranquil peaceful placid",
    "excited": "excited excitedly excitement enthusiastic enthusiastically thrilled exhilarated",
    "frustrated": "frustrated frustration exasperated exasperation",
    "contemptuous": "contemptuous contempt scornful scorn disdainful disdain sneering derisive",
    "bored": "bored boredom uninterested disinterested apathetic listless",
    "sleepy": "sleepy drowsy tired weary",
})
_EMOTION_COMPATIBLE: dict[str, set[str]] = {
    "neutral": {"calm", "bored", "sleepy"},
    "calm": {"neutral", "bored", "sleepy", "happy"},
    "happy": {"excited", "surprised", "calm"},
    "excited": {"happy", "surprised"},
    "surprised": {"excited", "happy", "fearful"},
    "angry": {"frustrated", "contemptuous", "disgusted"},
    "frustrated": {"angry", "sad"},
    "contemptuous": {"angry", "disgusted"},
    "disgusted": {"angry", "contemptuous"},
    "sad": {"sleepy", "frustrated"},
    "fearful": {"surprised"},
    "bored": {"neutral", "calm", "sleepy"},
    "sleepy": {"bored", "calm", "neutral", "sad"},
}
for _a, _others in list(_EMOTION_COMPATIBLE.items()):  # make the relation symmetric
    for _b in _others:
        _EMOTION_COMPATIBLE.setdefault(_b, set()).add(_a)

_EMOTION_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(_EMOTION_WORDS, key=len, reverse=True))
                         + r")\b(?!\s+(?:to\s+(?:help|assist|describe|provide|answer|explain|share|do|"
                         r"oblige)|accent|pitch|pace|speed|tempo|rate|background|environment|noise|room|"
                         r"acoustics?|setting|recording|volume|level|sound quality|quality)\b)",
                         re.IGNORECASE)
_EMOTION_SCAN = _Scan(_EMOTION_RE, _first_words(_EMOTION_WORDS))
_NEGATION = re.compile(r"\b(?:not|no|never|without|nor|neither|lacks?|lacking|absence|free of|rather than|"
                       r"instead of|isn't|wasn't|aren't|doesn't|don't|didn't|cannot|can't|couldn't|won't|hardly|nothing|"
                       r"devoid)\b",
                       re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[.;:!?,]|\bbut\b|\band\b", re.IGNORECASE)


def _negated(text: str, start: int) -> bool:
    before = text[max(0, start - 80):start]
    parts = _CLAUSE_BREAK.split(before)
    window = " ".join(parts[-1].split()[-5:]) if parts else ""
    return bool(_NEGATION.search(window.replace("’", "'")))


_SPEAK = (r"(?:voice|voices|speaking|speaks|spoke|talking|talks|says|saying|said|speaker|narrat\w*|reading|reads|"
          r"asks|asking|tone|delivery|who)")
_PRONOUN_OBJ = (r"(?:voice|tone|speech|pitch|delivery|accent|words|pace|volume|intonation|emotion|emotions|"
                r"mood|speaking|manner|register|timbre|inflection|cadence|feelings|expression|vocal)")
_PRONOUN_VERB = (r"(?:speaks|says|sounds|talks|seems|appears|expresses|conveys|asks|uses|delivers|said|spoke|"
                 r"sounded|exclaims|states|mentions|(?:is|was)\s+(?:speaking|talking|saying|asking|expressing))")
_SLOT = (r"(?:hear|hears|heard|is|was|sounds? like|voice of|spoken by|said by|read by|features?|featuring|"
         r"contains?|containing|there(?:'s| is))")


def _gender_re(adjectives: str, nouns: str, subject: str, possessive: str) -> _Scan:
    pattern = re.compile(_alts(
        rf"\b(?:{adjectives})\b",
        rf"\b(?:{nouns})(?:'s|’s)?\s+{_SPEAK}\b",
        rf"\b{_SLOT}\s+(?:a|an|the|one)\s+(?:[\w-]+\s+){{0,3}}?(?:{nouns})\b",
        rf"\b{possessive}\s+(?:[\w-]+\s+)?{_PRONOUN_OBJ}\b",
        rf"\b{subject}\s+(?:\w+ly\s+)?{_PRONOUN_VERB}\b",
    ), re.IGNORECASE)
    return _Scan(pattern, frozenset(f"{adjectives}|{nouns}|{subject}|{possessive}".split("|")))


_MALE = _gender_re("male|masculine", "man|gentleman|guy|boy|men", "he", "his")
_FEMALE = _gender_re("female|feminine", "woman|lady|girl|women", "she", "her")

# Accent / nationality adjectives a response may use ("-" stands for a space or hyphen). "English" is
# matched only next to "accent"/"accented": "an English speaker" usually names the language.
_ACCENT_WORDS = _wordset("""american british scottish irish northern-irish welsh canadian australian new-zealand
    south-african african indian filipino singaporean malaysian hong-kong bermudian west-indian french german
    spanish italian portuguese brazilian mexican russian ukrainian polish dutch swedish norwegian danish finnish
    greek turkish arabic arab persian iranian israeli chinese mandarin cantonese japanese korean vietnamese thai
    indonesian hindi pakistani bangladeshi nigerian kenyan ghanaian jamaican caribbean european asian east-asian
    south-asian latin-american latino latina hispanic middle-eastern slavic scandinavian southern midwestern
    texan cockney new-york boston foreign non-native kiwi aussie""")
_ACCENT_LIST = sorted({w.replace("-", " ") for w in _ACCENT_WORDS}, key=len, reverse=True)
_ACCENT_ALT = "|".join(re.escape(w).replace(r"\ ", r"[\s-]") for w in _ACCENT_LIST)
_ACCENT_NOUN = (r"(?:accent|accented|speaker|man|woman|male|female|voice|lady|gentleman|guy|girl|boy|narrator|"
                r"person|pronunciation|intonation)")
_ACCENT_RE = re.compile(_alts(
    rf"\b(?P<a>{_ACCENT_ALT})(?:[\s-]english)?[\s-]{_ACCENT_NOUN}\b",
    r"\b(?P<b>english)[\s-](?:accent|accented)\b",
    rf"\baccent\s+(?:that\s+|which\s+)?(?:sounds|seems|is|was)\s+(?:\w+\s+)?(?P<c>{_ACCENT_ALT}|english)\b",
    rf"\baccent\s+(?:from|of)\s+(?:the\s+)?(?P<d>{_ACCENT_ALT})\b",
), re.IGNORECASE)
_ACCENT_SCAN = _Scan(_ACCENT_RE, _first_words(_ACCENT_LIST) | {"english", "accent"})
_ACCENT_WORD_RE = re.compile(rf"\b(?:{_ACCENT_ALT}|english)\b", re.IGNORECASE)
_ACCENT_FAMILY: dict[str, set[str]] = {
    "british": {"english", "scottish", "welsh", "northern irish", "cockney"},
    "english": {"british", "cockney"},
    "scottish": {"british"}, "welsh": {"british"}, "northern irish": {"british", "irish"},
    "american": {"southern", "midwestern", "texan", "new york", "boston", "us"},
    "southern": {"american"}, "midwestern": {"american"}, "texan": {"american"},
    "new york": {"american"}, "boston": {"american"},
    "chinese": {"mandarin", "cantonese", "hong kong", "asian", "east asian"},
    "mandarin": {"chinese"}, "cantonese": {"chinese", "hong kong"}, "hong kong": {"chinese", "cantonese"},
    "indian": {"south asian", "hindi"}, "hindi": {"indian"}, "south asian": {"indian", "pakistani", "bangladeshi"},
    "arabic": {"arab", "middle eastern"}, "arab": {"arabic", "middle eastern"},
    "spanish": {"hispanic", "latino", "latina"}, "mexican": {"hispanic", "latino", "latina", "latin american"},
    "new zealand": {"kiwi"}, "australian": {"aussie"},
    "west indian": {"caribbean", "jamaican"}, "jamaican": {"caribbean", "west indian"},
}
_NATIVE_ENGLISH = {"american", "british", "english", "scottish", "irish", "northern irish", "welsh", "canadian",
                   "australian", "new zealand", "south african"}

_DECADES = {"teens": 13, "twenties": 20, "thirties": 30, "forties": 40, "fifties": 50, "sixties": 60,
            "seventies": 70, "eighties": 80, "nineties": 90}
_AGE_WORDS: dict[str, tuple[int, int]] = {
    **{word: (d, 19 if word == "teens" else d + 9) for word, d in _DECADES.items()},
    "child": (0, 12), "teen": (13, 19), "teenage": (13, 19), "teenager": (13, 19), "adolescent": (12, 19),
    "young adult": (18, 35), "adult": (18, 64), "middle-aged": (40, 64), "middle aged": (40, 64),
    "senior": (60, 120), "elderly": (60, 120), "older adult": (55, 120),
}
_AGE_RE = re.compile(_alts(
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
_AGE_SCAN = _Scan(_AGE_RE, _wordset(
    "year years yr yrs aged age 10s 20s 30s 40s 50s 60s 70s 80s 90s teens twenties thirties forties fourties "
    "fifties sixties seventies eighties nineties teenage teenager teenagers adolescent elderly citizen adult "
    "child boy girl kid old older aging ageing"), prefixes=("mid",))


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


def _contradicts_seed(c: _Ctx) -> str | None:
    attrs = c.attributes
    prose = c.prose.replace("’", "'")
    # Gender: only the opposite of the seed's.
    gender = normalise_label("gender", _attr(attrs, "gender") or "")
    opposite = {"female": ("male", _MALE), "male": ("female", _FEMALE)}.get(gender or "")
    if opposite:
        for match in opposite[1].finditer(prose, c.prose_words):
            if not _negated(prose, match.start()):
                return f"says {match.group(0).strip()!r} ({opposite[0]}) but the seed's gender is {gender}"
    # Emotion: only when the seed names one we know.
    seed_emotion_raw = _attr(attrs, "emotion")
    seed_emotion = normalise_label("emotion", seed_emotion_raw) if seed_emotion_raw else None
    if seed_emotion in _EMOTION_COMPATIBLE:
        for match in _EMOTION_SCAN.finditer(prose, c.prose_words):
            said = _EMOTION_WORDS[match.group(1).lower()]
            if said != seed_emotion and said not in _EMOTION_COMPATIBLE[seed_emotion] \
                    and not _negated(prose, match.start()):
                return f"names emotion {match.group(1)!r} ({said}) but the seed's emotion is {seed_emotion}"
    # Accent: any named accent must be the seed's (or a close family member of it).
    seed_accent = _attr(attrs, "accent")
    mentions = [(m.group(m.lastgroup or "a") or "", m.start()) for m in _ACCENT_SCAN.finditer(prose, c.prose_words)]
    for value in _json_values(c.obj, ("accent", "nationality")):
        if not _NEGATION.search(value):
            mentions += [(m.group(0), -1) for m in _ACCENT_WORD_RE.finditer(value)]
    for mention, start in mentions:
        if mention and (start < 0 or not _negated(prose, start)) and not _accent_ok(mention, seed_accent):
            where = f"the seed's accent is {seed_accent}" if seed_accent else "the seed has no accent"
            return f"names accent {mention!r} but {where}"
    # Age: any age mention must overlap the seed's age range.
    seed_age_raw = _attr(attrs, "age")
    seed_age = _seed_age_range(seed_age_raw) if seed_age_raw else None
    if seed_age_raw and seed_age is None:
        return None  # an age label we cannot place on a scale: no judgement
    ages = [(m.group(0), _age_range(m)) for m in _AGE_SCAN.finditer(prose, c.prose_words)]
    for value in _json_values(c.obj, ("age", "age_group", "age_range")):
        span = _seed_age_range(value)
        if span is not None:
            ages.append((value, span))
    for said, (lo, hi) in ages:
        if seed_age is None:
            return f"names an age ({said!r}) but the seed has none"
        if hi < seed_age[0] or lo > seed_age[1]:
            return f"names age {said!r} but the seed's age is {seed_age_raw}"
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


_RULES = {
    "empty": _empty, "truncated": _truncated, "refusal": _refusal, "injection": _injection, "format": _format,
    "too_short": _too_short, "too_long": _too_long, "wrong_language": _wrong_language,
    "leaks_seed": _leaks_seed, "contradicts_seed": _contradicts_seed,
}


def check_response(response: str, *, seed_description: str, attributes: Mapping[str, str] | None = None,
                   transcript: str | None = None, instruction: Instruction | str | None = None,
                   finish_reason: str | None = None, config: QCConfig | None = None) -> QCVerdict:
    """The first failing enabled rule (in RULE_ORDER) for this response, or ok.

    `attributes` are the seed's display label → word (`{"Gender": "Female"}`); when empty they are
    read back from the seed's trailing "(Label: value, …)". `instruction` may be a pool line
    (tags are parsed) or an already parsed Instruction.
    """
    config = config or QCConfig()
    if not config.enabled:
        return PASS
    if instruction is None or isinstance(instruction, str):
        instruction = parse_instruction(instruction or "")
    attrs = dict(attributes) if attributes else seed_attributes(seed_description)
    ctx = _Ctx(response=response or "", seed=seed_description, attributes=attrs, transcript=transcript,
               instruction=instruction, finish_reason=finish_reason, config=config)
    enabled = set(config.rules)
    for rule in RULE_ORDER:
        if rule not in enabled:
            continue
        if rule != "empty" and not ctx.text:
            continue  # nothing else is meaningful on an empty response (e.g. "empty" switched off)
        detail = _RULES[rule](ctx)
        if detail:
            return QCVerdict(ok=False, reason=rule, detail=detail)
    return PASS
