"""The terminal bar on a long-form run (issue 14): its last numbers are the run summary's.

Recordings built from espeak-ng sentences with known silences go through a real run (`run_plain`,
the `rules` backend) with the CLI's own bar as the progress hook; the bar's final line is read from
stderr and compared with the committed version's stats (the same sums the run summary prints:
clips in, rows, quarantined, recordings cut → segments). The second run quarantines one segment
mid-recording (its sidecar words exceed describe.max_transcript_chars) and a silent recording
whole; the shard-level case drives process_shard with tiny batches, so a recording's segments
straddle batches and a dropped recording follows the last full batch.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from flows.cli.run import _progress_bar
from flows.generate import run_plain
from schemas.config import RunConfig, parse_config
from schemas.manifest import Stats
from tasks.pipeline import Progress, process_shard, run_backend
from tasks.plan import load_shard_plan, plan_run
from tasks.run import launch_config, run_context, run_store
from tests.support.longform import Recording, build_recording, write_srt
from tests.support.paths import SAMPLE_CORPUS
from tests.support.speech import SENTENCES, SR, trim_quiet

LONG = SENTENCES[2]  # 77 characters: over the cap below, the other sentences are under it
CAP = 60
COUNTS = ("clips", "rows", "quarantined", "recordings_cut", "segments")
BAR = re.compile(r"(?P<n>\d+)/(?P<total>\d+) \[[^,\]]*, rows (?P<rows>\d+), quarantined (?P<q>\d+)"
                 r"(?:, cut (?P<cut>\d+) recordings → (?P<segments>\d+) segments)?")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, espeak: Callable[..., np.ndarray]) -> dict[str, Any]:
    """talks/: rec_a.wav with an SRT sidecar, rec_b.wav without one (segment mode always, one segment
    per sentence); quiet/: 8 s of digital silence (cut mode always: no speech); clips/: a short
    sample clip that stays whole."""
    root = tmp_path_factory.mktemp("progress_longform")
    sentences = [(trim_quiet(espeak("-s", "170", text=text)), text) for text in SENTENCES]
    rec_a = build_recording(root / "talks" / "rec_a.wav", sentences, seed=3, seconds=12)
    write_srt(root / "talks" / "rec_a.srt", rec_a)
    rec_b = build_recording(root / "talks" / "rec_b.wav", sentences, seed=4, seconds=12)
    assert any(u.text == LONG for u in rec_a.utterances) and any(u.text != LONG for u in rec_a.utterances)
    (root / "quiet").mkdir()
    sf.write(root / "quiet" / "hum.wav", np.zeros(8 * SR, np.int16), SR, subtype="PCM_16")
    (root / "clips").mkdir()
    shutil.copy(SAMPLE_CORPUS / "audio" / "arctic_slt_a0009.wav", root / "clips" / "short.wav")
    return {"root": root, "rec_a": rec_a, "rec_b": rec_b}


def _config(corpus: dict[str, Any], out: Path, *, quiet: bool = False, shard_size: int = 2,
            **describe: Any) -> RunConfig:
    root = corpus["root"]
    always = {"segment": {"mode": "always"}}
    sources = [{"path": str(root / "talks"), "dataset": "talks", "language": "en", **always},
               {"path": str(root / "clips"), "dataset": "clips", "language": "en"}]
    if quiet:
        # Dataset "void": planned after "talks" (refs go by id), so its recording is the shard's last.
        sources.append({"path": str(root / "quiet"), "dataset": "void", "language": "en", **always})
    return parse_config({
        "sources": sources,
        "output": {"root": str(out), "dataset": "lf", "shard_size": shard_size, "max_quarantine_ratio": 1.0},
        "segment": {"min_s": 1.0, "max_s": 6.0, "vad": "energy", "min_silence_s": 0.3},
        "describe": describe,
        "llm": {"backend": "rules"},
    })


def _bar_run(config: RunConfig, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, int], Stats]:
    """A run with the CLI's bar as its hook: the bar's last numbers and the committed version's stats."""
    hook, close = _progress_bar(True)
    try:
        manifest = run_plain(config, hook)
    finally:
        close()
    matches = list(BAR.finditer(capsys.readouterr().err))
    assert matches, "the bar never showed its counts"
    last = {k: int(v or 0) for k, v in matches[-1].groupdict().items()}
    return last, manifest.stats


def _assert_bar_is_summary(bar: dict[str, int], stats: Stats) -> None:
    assert (bar["n"], bar["total"]) == (stats.clips_in, stats.clips_in)
    assert (bar["rows"], bar["q"], bar["cut"], bar["segments"]) == (
        stats.rows, stats.quarantined, stats.recordings_cut, stats.segments)


def test_bar_ends_on_the_summary_of_a_long_form_run(corpus: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bar, stats = _bar_run(_config(corpus, tmp_path), capsys)
    n_a, n_b = len(corpus["rec_a"].utterances), len(corpus["rec_b"].utterances)
    # One segment per sentence (max_s 6 s, pauses >= 0.8 s); the short clip stays whole.
    assert (stats.clips_in, stats.recordings_cut, stats.segments) == (3, 2, n_a + n_b)
    assert (stats.rows, stats.quarantined) == (n_a + n_b + 1, 0)
    _assert_bar_is_summary(bar, stats)


def test_bar_counts_a_segment_and_a_recording_quarantined_mid_run(corpus: dict[str, Any], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bar, stats = _bar_run(_config(corpus, tmp_path, quiet=True, max_transcript_chars=CAP), capsys)
    rec_a: Recording = corpus["rec_a"]
    too_long = sum(u.text == LONG for u in rec_a.utterances)  # rec_a's sidecar words; rec_b has none
    assert stats.quarantine_by_reason == {"no_speech": 1, "transcript_too_long": too_long}
    assert stats.recordings_cut == 2 and stats.clips_in == 4
    assert stats.rows == stats.segments + 1 - too_long  # + the short clip
    _assert_bar_is_summary(bar, stats)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_shard_reports_sum_to_its_outcome_whatever_the_batches(corpus: dict[str, Any], tmp_path: Path,
                                                               batch_size: int) -> None:
    """Every report adds counts (none negative), the running totals never claim more clips out than
    cut so far, and the sum is the shard's outcome, including a silent recording dropped after the
    last full batch."""
    config = launch_config(_config(corpus, tmp_path, quiet=True, shard_size=100, max_transcript_chars=CAP))
    ctx, store = run_context(config), run_store(config)
    plan = plan_run(config, store, ctx.staging, ctx.run_id)
    assert plan.shards == 1
    events: list[Progress] = []
    outcome = process_shard(load_shard_plan(store, ctx.staging, 0), config, store, ctx,
                            run_backend(config, store, ctx), batch_size=batch_size, progress=events.append)
    assert events and {e.kind for e in events} == {"done"}
    total = dict.fromkeys(COUNTS, 0)
    for event in events:
        assert all(getattr(event, k) >= 0 for k in COUNTS), event
        for k in COUNTS:
            total[k] += getattr(event, k)
        # Out so far: at most the clips in so far, where a recording whose segments are still going
        # through counts as cut (-1 clip) but not yet as done (+1 clip): at most one such recording.
        assert total["rows"] + total["quarantined"] <= (
            total["clips"] - total["recordings_cut"] + total["segments"] + 1), (events, total)
    assert total == {k: getattr(outcome, k) for k in COUNTS}
    assert outcome.by_reason["no_speech"] == 1 and outcome.recordings_cut == 2
    # void/hum is dropped after rec_b's last segment, whose batch quarantines nothing else: full or
    # not, the shard's last report carries it.
    assert events[-1].quarantined == 1 and events[-1].clips >= 1
