"""Speech regions → segments: lengths within bounds, cuts in the longest pauses, stable ids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tasks.segment.cut import cut_segments, segment_id


def _random_regions(seed: int, duration: float) -> list[tuple[float, float]]:
    """Speech runs of 0.2-12 s separated by pauses of 0.05-3 s (seeded)."""
    rng = np.random.default_rng(seed)
    regions, t = [], rng.uniform(0, 2)
    while t < duration - 1:
        end = min(duration, t + rng.uniform(0.2, 12.0))
        regions.append((round(t, 3), round(end, 3)))
        t = end + rng.uniform(0.05, 3.0)
    return regions


@pytest.mark.parametrize("seed", range(20))
def test_segments_within_bounds_ordered_and_disjoint(seed: int) -> None:
    regions = _random_regions(seed, 600.0)
    segments = cut_segments(regions, 600.0, "rec", min_s=2.0, max_s=30.0, pad_s=0.15)
    assert segments
    for seg in segments:
        assert 2.0 <= seg.duration_s <= 30.0 + 1e-9, seg
        assert 0.0 <= seg.start_s < seg.end_s <= 600.0
        assert seg.id == f"rec@{round(seg.start_s * 1000)}-{round(seg.end_s * 1000)}"
        assert 0 < seg.speech_s <= seg.duration_s
    for left, right in itertools.pairwise(segments):
        assert left.end_s <= right.start_s
    # Only pieces that could not reach min_s are lost: almost all speech is kept.
    kept = sum(s.speech_s for s in segments)
    total = sum(e - s for s, e in regions)
    assert kept >= 0.97 * total


def test_long_speech_without_pause_is_split_within_max_s() -> None:
    segments = cut_segments([(1.0, 95.0)], 96.0, "rec", min_s=2.0, max_s=30.0, pad_s=0.15)
    assert len(segments) == 4  # 94 s in parts of at most 29.7 s of speech
    assert all(seg.duration_s <= 30.0 for seg in segments)
    assert segments[0].start_s == pytest.approx(0.85) and segments[-1].end_s == pytest.approx(95.15)
    for left, right in itertools.pairwise(segments):
        assert left.end_s == right.start_s  # contiguous: nothing of the speech is lost


def test_cut_at_the_longest_pause() -> None:
    # 40 s of speech; pauses of 0.3 s at 10 s, 1.5 s at 20 s and 0.5 s at 30 s: one cut, in the 1.5 s one.
    regions = [(0.0, 10.0), (10.3, 20.0), (21.5, 30.0), (30.5, 40.0)]
    segments = cut_segments(regions, 40.0, "r", min_s=2.0, max_s=30.0, pad_s=0.15)
    assert [(s.start_s, s.end_s) for s in segments] == [(0.0, 20.15), (21.35, 40.0)]


def test_preferred_cut_wins_over_a_longer_pause() -> None:
    regions = [(0.0, 10.0), (10.3, 20.0), (21.5, 30.0), (30.5, 40.0)]
    segments = cut_segments(regions, 40.0, "r", min_s=2.0, max_s=30.0, pad_s=0.15, preferred_cuts=[10.1])
    assert [(s.start_s, s.end_s) for s in segments] == [(0.0, 10.15), (10.15, 40.0)]


def test_padding_never_crosses_the_middle_of_a_short_pause() -> None:
    regions = [(0.0, 20.0), (20.1, 40.0)]
    a, b = cut_segments(regions, 40.0, "r", min_s=2.0, max_s=30.0, pad_s=0.15)
    assert a.end_s == b.start_s == pytest.approx(20.05)


def test_short_pieces_merge_into_a_neighbour_or_are_dropped() -> None:
    # A 0.5 s word close to a 5 s sentence joins it; a lone 0.3 s click 60 s later is dropped.
    regions = [(1.0, 6.0), (6.5, 7.0), (67.0, 67.3)]
    segments = cut_segments(regions, 80.0, "r", min_s=2.0, max_s=30.0, pad_s=0.15)
    assert [(s.start_s, s.end_s) for s in segments] == [(0.85, 7.15)]
    assert segments[0].speech_s == pytest.approx(5.5)
    assert cut_segments([], 10.0, "r") == []


def test_ids_are_stable_and_in_integer_milliseconds() -> None:
    regions = _random_regions(3, 300.0)
    first = cut_segments(regions, 300.0, "book/ch01")
    second = cut_segments(list(regions), 300.0, "book/ch01")
    assert [s.id for s in first] == [s.id for s in second]
    assert segment_id("a", 1.2346, 2.0) == "a@1235-2000"
    assert all(s.start_s == round(s.start_s, 3) and s.end_s == round(s.end_s, 3) for s in first)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_s": 30.0, "max_s": 30.0}, "min_s < max_s"),
    ({"min_s": 0.2, "pad_s": 0.15}, "under min_s / 2"),
])
def test_bad_bounds_are_refused_with_the_fix(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cut_segments([(0.0, 5.0)], 5.0, "r", **kwargs)
