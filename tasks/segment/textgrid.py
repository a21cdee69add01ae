"""Praat TextGrid sidecars (both text forms), read into cues for tasks.segment.transcripts.

The long form's keys are skipped, leaving the short form's values, so one tokenizer reads both.
"""

from __future__ import annotations

import re
from typing import Any

from tasks.llm.messages import sanitize_transcript
from tasks.segment.cues import (
    PAUSE_MARKS,
    Cue,
    TranscriptError,
    Word,
    checked_span,
    group_words,
    speaker_name,
)

_TG_TOKEN = re.compile(r'"((?:[^"]|"")*)"|(<exists>|<absent>)|(-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)'
                       r"|([A-Za-z_][A-Za-z_0-9]*)|(![^\n]*|\[\s*\d*\s*\]|\S)")
# The long form's keys (skipped); any other bare word is text that lost its quotes.
_TG_KEYS = frozenset({"File", "type", "Object", "class", "xmin", "xmax", "tiers", "size", "item", "name",
                      "intervals", "points", "text", "number", "mark", "time"})


class _Tokens:
    """TextGrid values in order (strings, numbers, flags), each with its line number."""

    def __init__(self, text: str, label: str) -> None:
        self.items: list[tuple[str, str | float, int]] = []
        self.label, self.i, self.open_quote = label, 0, ""
        line = 1
        pos = 0
        for m in _TG_TOKEN.finditer(text):
            line += text.count("\n", pos, m.start())
            pos = m.start()
            if m.group(1) is not None:
                self.items.append(("str", m.group(1).replace('""', '"'), line))
                if "\n" in m.group(1) and not self.open_quote:  # legal, but mostly a missing quote
                    self.open_quote = f" (the text opened on line {line} spans lines: is a closing quote missing?)"
            elif m.group(2) is not None:
                self.items.append(("flag", m.group(2), line))
            elif m.group(3) is not None:
                self.items.append(("num", float(m.group(3)), line))
            elif m.group(4) is not None and m.group(4) not in _TG_KEYS:
                raise TranscriptError(label, line, f"unquoted text {m.group(4)!r}; TextGrid texts are in double "
                                                   f"quotes{self.open_quote}")
            elif m.group(5) == '"':
                raise TranscriptError(label, line, "a text's closing double quote is missing")

    def take(self, kind: str, what: str) -> tuple[Any, int]:
        if self.i >= len(self.items):
            last = self.items[-1][2] if self.items else 1
            raise TranscriptError(self.label, last, f"file ends early: expected {what}{self.open_quote}")
        got_kind, value, line = self.items[self.i]
        if got_kind != kind:
            raise TranscriptError(self.label, line, f"expected {what}, found {value!r}{self.open_quote}")
        self.i += 1
        return value, line


def read_textgrid(text: str, label: str) -> list[Cue]:
    """Cues of a TextGrid: a words tier (per speaker: `<name> - words`) grouped at pauses, else the
    first interval tier's non-empty intervals."""
    tokens = _Tokens(text, label)
    file_type, line = tokens.take("str", 'File type = "ooTextFile"')
    if file_type not in ("ooTextFile", "ooTextFile short"):
        raise TranscriptError(label, line, f"file type {file_type!r} is not a Praat text file (binary "
                                           "TextGrids: save as text from Praat)")
    object_class, line = tokens.take("str", 'Object class = "TextGrid"')
    if object_class != "TextGrid":
        raise TranscriptError(label, line, f"object class {object_class!r} is not TextGrid")
    tokens.take("num", "xmin")
    tokens.take("num", "xmax")
    flag, _ = tokens.take("flag", "tiers? <exists>")
    tiers: list[tuple[str, list[tuple[float, float, str]]]] = []
    count, _ = tokens.take("num", "the number of tiers") if flag == "<exists>" else (0, 0)
    for _ in range(int(count)):
        kind, _ = tokens.take("str", 'a tier class ("IntervalTier" or "TextTier")')
        tier_name, _ = tokens.take("str", "a tier name")
        tokens.take("num", "tier xmin")
        tokens.take("num", "tier xmax")
        size, _ = tokens.take("num", "the number of intervals")
        intervals = []
        for _ in range(int(size)):
            if kind == "IntervalTier":
                start, line = tokens.take("num", "interval xmin")
                end, _ = tokens.take("num", "interval xmax")
                mark, _ = tokens.take("str", "interval text")
                intervals.append((*checked_span(label, line, start, end), mark))
            else:  # a point tier: time and mark, skipped
                tokens.take("num", "point time")
                tokens.take("str", "point mark")
        if kind == "IntervalTier":
            tiers.append((tier_name, intervals))
    if not tiers:
        raise TranscriptError(label, None, "no interval tier (only point tiers, or none)")
    word_tiers = [(n, iv) for n, iv in tiers if re.fullmatch(r"(?:(.+?)\s*-\s*)?words?", n.strip(), re.IGNORECASE)]
    if word_tiers:
        cues = []
        for tier_name, intervals in word_tiers:
            prefix = re.match(r"(.+?)\s*-\s*words?$", tier_name.strip(), re.IGNORECASE)
            speaker = speaker_name(prefix.group(1)) if prefix else None
            words: list[Word] = []
            pause = False
            for start, end, mark in intervals:
                word = sanitize_transcript(mark)
                if not word or word.lower() in PAUSE_MARKS:
                    pause = True
                    continue
                if pause and words:  # an empty interval between words is a pause: a cue boundary
                    cues.extend(group_words(words, speaker))
                    words = []
                pause = False
                words.append(Word(start, end, word))
            cues.extend(group_words(words, speaker))
        return cues
    return [Cue(start, end, t) for start, end, mark in tiers[0][1]
            if (t := sanitize_transcript(mark)) and t.lower() not in PAUSE_MARKS]
