"""Timed text of a recording (`Cue`, `Word`) and the two rules that cut it to segments.

What every transcript format becomes (`tasks.segment.transcripts` reads the files), and what the
segment cutter and the pipeline use: `text_in_span` gives a segment its words, `cue_boundaries`
gives the cutter the places it prefers to cut. Times are seconds from the start of the recording.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tasks.llm.messages import sanitize_prompt_text

__all__ = ["EPS_S", "PAUSE_MARKS", "Cue", "TranscriptError", "Word", "checked_span", "cue_boundaries", "group_words",
           "sorted_cues", "speaker_name", "text_in_span"]

# Interval or word texts that mean "no speech here" (besides blank ones): aligners' silence marks.
PAUSE_MARKS = frozenset({"sil", "sp", "<sil>", "<eps>"})

EPS_S = 1e-6  # times closer than this are the same instant (file formats round to ms)


@dataclass(frozen=True)
class Word:
    """One timed word."""

    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Cue:
    """One timed stretch of text (a subtitle cue, an utterance, a run of words between pauses)."""

    start_s: float
    end_s: float
    text: str
    speaker: str | None = None
    words: tuple[Word, ...] = ()


class TranscriptError(ValueError):
    """A transcript that cannot be read: names the file, the line (or item) and what is wrong."""

    def __init__(self, name: str, where: int | str | None, problem: str) -> None:
        place = f" line {where}" if isinstance(where, int) else f" {where}" if where else ""
        super().__init__(f"{name}{place}: {problem}")
        self.name, self.where, self.problem = name, where, problem


def text_in_span(cues: Sequence[Cue], start_s: float, end_s: float) -> str | None:
    """The words of `cues` spoken inside [start_s, end_s), joined with single spaces; None if none.

    A cue with word timings gives each word whose midpoint lies in [start_s, end_s) (half-open, so
    a word on the boundary of two adjacent segments goes to exactly one). A cue without them goes
    in whole when more than half of its duration lies inside the span (a zero-length cue: when it
    lies in the span), so a cue is never split mid-sentence and never given to two segments.
    """
    parts: list[str] = []
    for cue in cues:
        if cue.words:
            parts.extend(w.text for w in cue.words if start_s <= (w.start_s + w.end_s) / 2 < end_s)
        elif cue.end_s - cue.start_s <= EPS_S:
            if start_s <= cue.start_s < end_s:
                parts.append(cue.text)
        elif min(end_s, cue.end_s) - max(start_s, cue.start_s) > 0.5 * (cue.end_s - cue.start_s):
            parts.append(cue.text)
    text = " ".join(p for p in parts if p)
    return text or None


def cue_boundaries(cues: Sequence[Cue]) -> list[float]:
    """Preferred cut points, sorted: the midpoint of each gap between consecutive cues, and the end
    of a cue where the next one starts right there. Overlapping cues give none (no silence)."""
    points: set[float] = set()
    reach: float | None = None  # the latest end so far (an earlier long cue may cover later ones)
    for cue in sorted_cues(cues):
        if reach is not None:
            if abs(cue.start_s - reach) <= EPS_S:
                points.add(round(reach, 6))
            elif cue.start_s > reach:
                points.add(round((reach + cue.start_s) / 2, 6))
        reach = cue.end_s if reach is None else max(reach, cue.end_s)
    return sorted(points)


def sorted_cues(cues: Sequence[Cue]) -> list[Cue]:
    """Cues by start (then end)."""
    return sorted(cues, key=lambda c: (c.start_s, c.end_s))


def checked_span(label: str, where: int | str, start: float, end: float) -> tuple[float, float]:
    """(start, end) when both are finite, start >= 0 and end >= start; else TranscriptError."""
    if not (math.isfinite(start) and math.isfinite(end)):
        raise TranscriptError(label, where, f"time is not a finite number ({start}, {end})")
    if start < 0:
        raise TranscriptError(label, where, f"start {start} is negative")
    if end < start:
        raise TranscriptError(label, where, f"end {end} is before start {start}")
    return start, end


def group_words(words: Sequence[Word], speaker: str | None = None) -> list[Cue]:
    """Consecutive words (sorted) as cues, a new cue after every pause (any gap between words)."""
    runs: list[list[Word]] = []
    for word in words:
        if runs and word.start_s <= runs[-1][-1].end_s + EPS_S:
            runs[-1].append(word)
        else:
            runs.append([word])
    return [Cue(run[0].start_s, max(w.end_s for w in run), " ".join(w.text for w in run), speaker, tuple(run))
            for run in runs]


def speaker_name(raw: object) -> str | None:
    """A speaker label from a transcript, through the prompt sanitiser (it reaches the seed); None if empty."""
    text = sanitize_prompt_text(raw, "value") if raw is not None else ""
    return text or None
