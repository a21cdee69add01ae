"""Speech regions → segments within [min_s, max_s], cut at the longest pauses, with stable ids.

Why "split only where needed, at the longest pause": a recording is one stream of speech; each cut
costs context (a sentence split in two, a transcript cue broken), so the fewest cuts that bring
every segment under `max_s` are made, each in the longest pause available (recursively), which
is where sentences and turns end. A cut point given by a transcript (`preferred_cuts`, e.g. cue
boundaries) wins over a longer pause without one, so the text can be cut with the audio.
A region with no pause at all is split into equal parts. Pieces shorter than `min_s` are merged
into a neighbour when that stays within `max_s`, else dropped (a lone cough in an hour of
silence). Each segment is padded by `pad_s` on both sides, never past the middle of the pause it
was cut in, never outside the recording.

Ids are `<recording id>@<start ms>-<end ms>` of the padded segment: integers from the same
arithmetic on the same regions, so the same audio gives the same ids on every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PREFERRED_TOLERANCE_S = 0.2  # a preferred cut this close to a pause marks that pause


@dataclass(frozen=True)
class SpeechSegment:
    """One clip cut from a recording: padded [start_s, end_s), its id, and the VAD speech inside."""

    id: str
    start_s: float
    end_s: float
    speech_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def segment_id(recording_id: str, start_s: float, end_s: float) -> str:
    """`<recording id>@<start ms>-<end ms>`, integer milliseconds (the parent's id stays readable)."""
    return f"{recording_id}@{round(start_s * 1000)}-{round(end_s * 1000)}"


def _ms(seconds: float) -> float:
    """Seconds rounded to whole milliseconds: every boundary lands on the grid the id is written in."""
    return round(seconds * 1000) / 1000


def cut_segments(regions: Sequence[tuple[float, float]], duration_s: float, recording_id: str, *,
                 min_s: float = 2.0, max_s: float = 30.0, pad_s: float = 0.15,
                 preferred_cuts: Sequence[float] = ()) -> list[SpeechSegment]:
    """Segments of a recording from its speech regions (seconds, sorted, non-overlapping)."""
    if not 0 < min_s < max_s:
        raise ValueError(f"cut_segments: need 0 < min_s < max_s, got min_s={min_s}, max_s={max_s}")
    if not 0 <= 2 * pad_s < min_s:
        raise ValueError(f"cut_segments: pad_s={pad_s} must be >= 0 and under min_s / 2 ({min_s / 2})")
    spans = _clean(regions, duration_s)
    if not spans:
        return []
    limit = max_s - 2 * pad_s  # the speech of a segment, so that padded it is still within max_s
    preferred = sorted(float(c) for c in preferred_cuts)
    pieces: list[list[tuple[float, float]]] = []
    _split(spans, limit, min_s - 2 * pad_s, preferred, pieces)
    pieces = _merge_short(pieces, duration_s, pad_s, min_s, limit)
    return _segments(pieces, duration_s, recording_id, pad_s)


def _clean(regions: Sequence[tuple[float, float]], duration_s: float) -> list[tuple[float, float]]:
    spans = sorted((max(0.0, float(s)), min(duration_s, float(e))) for s, e in regions)
    out: list[tuple[float, float]] = []
    for start, end in spans:
        if end <= start:
            continue
        if out and start <= out[-1][1]:  # overlapping or touching: one region
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _split(spans: list[tuple[float, float]], limit: float, min_speech: float, preferred: list[float],
           out: list[list[tuple[float, float]]]) -> None:
    """Append pieces of `spans`, each spanning at most `limit` s, cut recursively at the best pause."""
    if spans[-1][1] - spans[0][0] <= limit:
        out.append(spans)
        return
    if len(spans) == 1:
        out.extend([[part] for part in _split_region(spans[0], limit, preferred)])
        return
    i = _best_gap(spans, min_speech, preferred)
    _split(spans[: i + 1], limit, min_speech, preferred, out)
    _split(spans[i + 1:], limit, min_speech, preferred, out)


def _best_gap(spans: list[tuple[float, float]], min_speech: float, preferred: list[float]) -> int:
    """Index i of the pause after spans[i] to cut in: one marked by a preferred cut first, then one
    leaving at least `min_speech` on both sides, then the longest; ties go to the earliest."""
    first, last = spans[0][0], spans[-1][1]
    best_key: tuple[bool, bool, float] | None = None
    best = 0
    for i in range(len(spans) - 1):
        gap_start, gap_end = spans[i][1], spans[i + 1][0]
        marked = _marked(gap_start, gap_end, preferred)
        balanced = gap_start - first >= min_speech and last - gap_end >= min_speech
        key = (marked, balanced, round(gap_end - gap_start, 6))
        if best_key is None or key > best_key:
            best_key, best = key, i
    return best


def _marked(gap_start: float, gap_end: float, preferred: list[float]) -> bool:
    lo, hi = gap_start - PREFERRED_TOLERANCE_S, gap_end + PREFERRED_TOLERANCE_S
    return any(lo <= cut <= hi for cut in preferred)


def _split_region(region: tuple[float, float], limit: float, preferred: list[float]) -> list[tuple[float, float]]:
    """A region longer than `limit` with no pause: at a preferred cut nearest its middle when one
    lies inside and leaves both parts within reach, else in equal parts."""
    start, end = region
    inside = [c for c in preferred if start < c < end]
    if inside:
        middle = (start + end) / 2
        cut = _ms(min(inside, key=lambda c: (abs(c - middle), c)))
        if cut - start <= limit or end - cut <= limit:
            left = _split_region((start, cut), limit, []) if cut - start > limit else [(start, cut)]
            right = _split_region((cut, end), limit, []) if end - cut > limit else [(cut, end)]
            return left + right
    parts = math.ceil((end - start) / limit)
    edges = [_ms(start + (end - start) * k / parts) for k in range(parts + 1)]
    edges[0], edges[-1] = start, end
    return [(edges[k], edges[k + 1]) for k in range(parts)]


def _bounds(pieces: list[list[tuple[float, float]]], i: int, duration_s: float, pad_s: float) -> tuple[float, float]:
    """Padded [start, end) of pieces[i]: `pad_s` each side, never past the middle of the pause to a
    neighbour, never outside the recording."""
    piece = pieces[i]
    lower = 0.0 if i == 0 else (pieces[i - 1][-1][1] + piece[0][0]) / 2
    upper = duration_s if i + 1 == len(pieces) else (piece[-1][1] + pieces[i + 1][0][0]) / 2
    return _ms(max(lower, piece[0][0] - pad_s)), _ms(min(upper, piece[-1][1] + pad_s))


def _merge_short(pieces: list[list[tuple[float, float]]], duration_s: float, pad_s: float, min_s: float,
                 limit: float) -> list[list[tuple[float, float]]]:
    """A piece shorter than `min_s` once padded joins the nearer neighbour when their speech spans
    at most `limit`; when neither fits it is dropped. Repeated until every piece is long enough."""
    pieces = [p for p in pieces if p]
    i = 0
    while i < len(pieces):
        start, end = _bounds(pieces, i, duration_s, pad_s)
        if end - start >= min_s - 1e-9:
            i += 1
            continue
        piece = pieces[i]
        options = []
        if i > 0 and piece[-1][1] - pieces[i - 1][0][0] <= limit:
            options.append((piece[0][0] - pieces[i - 1][-1][1], i - 1))
        if i + 1 < len(pieces) and pieces[i + 1][-1][1] - piece[0][0] <= limit:
            options.append((pieces[i + 1][0][0] - piece[-1][1], i + 1))
        if options:
            _, j = min(options)
            lo, hi = min(i, j), max(i, j)
            pieces[lo:hi + 1] = [pieces[lo] + pieces[hi]]
            i = max(0, lo - 1)  # the merged piece changes its neighbours' padding: look again from before it
        else:
            del pieces[i]
            i = max(0, i - 1)
    return pieces


def _segments(pieces: list[list[tuple[float, float]]], duration_s: float, recording_id: str,
              pad_s: float) -> list[SpeechSegment]:
    segments: list[SpeechSegment] = []
    for i, piece in enumerate(pieces):
        start, end = _bounds(pieces, i, duration_s, pad_s)
        speech = sum(min(e, end) - max(s, start) for s, e in piece if min(e, end) > max(s, start))
        segments.append(SpeechSegment(segment_id(recording_id, start, end), start, end, round(speech, 3)))
    return segments
