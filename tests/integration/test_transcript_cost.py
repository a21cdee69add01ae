"""What a 10.8 MB hostile transcript costs: the cap check is constant time, the sanitiser linear."""

from __future__ import annotations

import time

import pytest

from tasks.llm.messages import sanitize_prompt_text, transcript_too_long
from tests.support.corrupt_zoo import (
    CHAT_TOKEN,
    hostile_text,
)


def test_ten_megabyte_transcript_costs(capsys: pytest.CaptureFixture[str]) -> None:
    """The cap check is constant time; the sanitiser itself is linear (it never sees such a text in a run)."""
    huge = hostile_text(10_800_000)
    t0 = time.perf_counter()
    for _ in range(1000):
        assert transcript_too_long(huge, 2000)
    check_s = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    clean = sanitize_prompt_text(huge)
    sanitise_s = time.perf_counter() - t0
    small = hostile_text(1_080_000)
    t0 = time.perf_counter()
    sanitize_prompt_text(small)
    small_s = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n10.8 MB transcript: cap check {check_s * 1e6:.2f} us, sanitise {sanitise_s:.2f} s "
              f"(1.08 MB: {small_s:.2f} s)")
    assert check_s < 1e-4
    assert sanitise_s < 40 * small_s + 2.0  # linear (quadratic would be ~100x), as a repeated-marker loop was not
    assert not CHAT_TOKEN.search(clean) and "[" not in clean and "Gender:" not in clean
    assert not transcript_too_long(None, 1) and not transcript_too_long("x" * 2000, 2000)
