"""Live progress ops can read: the meter behind the UI artifact and the terminal bar (counts, a rate
that leaves start-up and reused shards out, an ETA), and distributions read along their scales."""

from __future__ import annotations

import re

import pytest

from flows.cli.run import _progress_bar
from flows.progress import ProgressMeter, duration_text
from flows.reporting import RunSummary, distributions_markdown, summary_table
from schemas.manifest import Stats
from tasks.attribute_order import in_scale_order
from tasks.describe import load_bins
from tasks.pipeline import Progress, report_total


class Clock:
    """A hand-moved monotonic clock: rates become exact numbers."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_meter_rate_leaves_start_up_and_reused_shards_out() -> None:
    clock = Clock()
    meter = ProgressMeter(clips_total=100, shards_total=4, clock=clock)
    assert (meter.clips_per_s(), meter.eta_s()) == (None, None)
    clock.now += 300  # Prefect start-up, models, planning: not part of the rate
    meter.start()
    meter.add(25, 25, reused=True, shard=True, audio_seconds=900.0)  # an earlier attempt's shard: instant
    assert meter.clips_per_s() is None and meter.eta_s() is None  # nothing measured yet, not "infinitely fast"
    clock.now += 10
    meter.add(25, 23, shard=True, by_reason={"missing_file": 1, "silent": 1}, audio_seconds=72.0)
    assert meter.clips_per_s() == pytest.approx(2.5)  # 25 clips in 10 s since start(), reused ones excluded
    assert meter.audio_hours_per_hour() == pytest.approx(7.2)  # 72 s of audio in 10 s of wall time
    assert meter.eta_s() == pytest.approx(20.0)  # 50 clips left at 2.5 clips/s
    fields = dict(meter.fields())
    assert fields["shards done"] == "2/4" and fields["shards reused"].startswith("1 ")
    assert fields["clips done"] == "50/100" and fields["rows"] == "48" and fields["quarantined"] == "2"
    assert fields["quarantined: missing_file"] == "1" and fields["quarantined: silent"] == "1"
    assert fields["audio hours"] == "0.2700" and fields["clips/s"] == "2.50" and fields["ETA"] == "20 s"
    meter.add(50, 50, shard=True)
    meter.add(0, 0, shard=True)
    assert meter.eta_s() == 0.0 and dict(meter.fields())["ETA"] == "0 s" and meter.percent() == 100.0
    table = meter.markdown("demo")
    assert table.startswith("**demo**: 100% of clips, ETA 0 s") and "| shards done | 4/4 |" in table


def test_meter_without_start_measures_from_the_first_finished_batch() -> None:
    clock = Clock()
    meter = ProgressMeter(clips_total=10, clock=clock)
    meter.add(4, 4)  # the first batch starts the clock; its clips are done at that instant
    assert meter.clips_per_s() is None
    clock.now += 2
    meter.add(4, 3)
    assert meter.clips_per_s() == pytest.approx(2.0) and meter.eta_s() == pytest.approx(1.0)


def test_duration_text() -> None:
    assert [duration_text(s) for s in (0, 0.4, 42, 200, 7500)] == ["0 s", "0 s", "42 s", "3 min 20 s", "2 h 05 min"]


def test_terminal_bar_shows_clips_rows_quarantined_rate_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    hook, close = _progress_bar(True, clock=clock)
    assert hook is not None
    try:  # driven through the pipeline's own reporting functions, as process_shard calls them
        clock.now += 120  # start-up before the first clip finishes
        report_total(hook, 12)
        hook(Progress("reused", 4, 4))  # a shard finished by an earlier attempt
        clock.now += 5
        hook(Progress("done", 4, 3, quarantined=1))  # first batch of this launch: starts the clock
        clock.now += 2
        hook(Progress("done", 2, 2))
        text = capsys.readouterr().err
    finally:
        close()
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "10/12" in last and " 83%" in last
    assert "rows 9, quarantined 1, 1.0 clips/s, ETA 2 s" in last  # 2 clips in 2 s; 2 clips left
    assert re.search(r"\[\d\d:\d\d, rows", last)  # tqdm's own rate and ETA (from process start) are gone
    assert "rows 7, quarantined 1, rate pending" in text  # before the second batch there is no rate yet


def test_disabled_bar_has_no_hook() -> None:
    hook, close = _progress_bar(False)
    assert hook is None
    close()


def test_values_follow_their_scale_not_their_count() -> None:
    bins = load_bins(None)
    pitch = {"High": 1, "Normal": 9, "Very low": 2, "Low": 5}
    assert [w for w, _ in in_scale_order("Pitch", pitch, bins)] == ["Very low", "Low", "Normal", "High"]
    noise = {"Very low": 3, "Moderate": 1, "Very high": 7}
    assert [w for w, _ in in_scale_order("Noise level", noise, bins)] == ["Very low", "Moderate", "Very high"]
    speed = {"Very fast": 1, "Slow": 4, "Normal": 2}
    assert [w for w, _ in in_scale_order("Speaking speed", speed, bins)] == ["Slow", "Normal", "Very fast"]
    age = {"Senior": 1, "40": 2, "Twenties": 5, "7": 1, "Child": 1}
    assert [w for w, _ in in_scale_order("Age", age, bins)] == ["Child", "Twenties", "Senior", "7", "40"]
    corpus = {"inform": 9, "Question": 1, "directive": 4}  # a corpus label: no scale, alphabetical
    assert [w for w, _ in in_scale_order("Act", corpus, bins)] == ["directive", "inform", "Question"]


def _summary(**update: object) -> RunSummary:
    base = RunSummary(dataset="demo", version="v0001", location="/x", run_id="run-1", clips_in=12, rows=10,
                      quarantined=2, audio_hours=0.01, shards=3, shards_skipped=0, seconds=1.0,
                      llm_backend="openai", llm_model="meta-llama/Llama-3.1-8B-Instruct@abc",
                      seed_attributes=["Gender", "Emotion", "Pitch"])
    return base.model_copy(update=update)


def test_distributions_give_scale_order_denominator_and_rows_without() -> None:
    stats = Stats(clips_in=12, rows=10, quarantined=2, attribute_counts={
        "Pitch": {"Normal": 5, "Very high": 1, "Low": 2},  # by count, as the shards report them
        "Gender": {"Male": 6, "Female": 4},
        "Act": {"statement": 3}})
    text = distributions_markdown(_summary(), stats, load_bins(None))
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}
    assert list(sections) == ["Gender", "Emotion", "Pitch", "Act"]  # seed attributes in config order, then labels
    pitch = sections["Pitch"]
    assert "10 rows: 8 with a value, 2 without Pitch" in pitch
    rows = re.findall(r"^\| ([^|]+?) \| (\d+) \| [█ ]*(\d+)% \|$", pitch, re.MULTILINE)
    assert rows == [("Low", "2", "20"), ("Normal", "5", "50"), ("Very high", "1", "10"), ("(without)", "2", "20")]
    assert "10 rows: 0 with a value, 10 without Emotion" in sections["Emotion"]  # configured but never found
    assert "| (without) | 10 |" in sections["Emotion"]
    assert "10 rows: 3 with a value, 7 without Act" in sections["Act"]


def test_summary_table_always_has_qc_and_names_the_backend() -> None:
    table = {r["metric"]: r["value"] for r in summary_table(_summary(), Stats(clips_in=12, rows=10, quarantined=2))}
    assert table["QC failures"] == 0
    assert table["LLM backend"] == "openai" and table["LLM model"] == "meta-llama/Llama-3.1-8B-Instruct@abc"
    failed = Stats(clips_in=12, rows=10, quarantined=2, qc_failures={"refusal": 2, "too_short": 1})
    table = {r["metric"]: r["value"] for r in summary_table(_summary(), failed)}
    assert (table["QC failures"], table["QC failures: refusal"], table["QC failures: too_short"]) == (3, 2, 1)


@pytest.mark.usefixtures("prefect_harness")
def test_a_hook_passed_to_the_flow_hears_every_clip_and_a_rerun_reports_them_reused(tmp_path) -> None:
    """The progress hook is a parameter (no module global): the flow reports the total, its in-process
    shard tasks each finished batch; a re-run of the committed config reports every clip as reused."""
    from flows.generate import run_generate
    from tests.support.datasets_support import sample_config

    config = sample_config(str(tmp_path / "out"), "hooked", workdir=tmp_path, shard_size=4)
    calls: list[Progress] = []
    summary = run_generate(config, calls.append)
    assert calls[0] == Progress("total", summary.clips_in)
    done = [c for c in calls[1:] if c.kind == "done"]
    assert len(done) == len(calls) - 1 >= summary.shards  # a batch at least per shard, nothing else
    assert sum(c.clips for c in done) == summary.clips_in and sum(c.rows for c in done) == summary.rows
    assert sum(c.quarantined for c in done) == summary.quarantined

    again: list[Progress] = []
    rerun = run_generate(config, again.append)
    assert rerun.already_committed and again[0] == Progress("total", summary.clips_in)
    assert {c.kind for c in again[1:]} == {"reused"} and sum(c.clips for c in again[1:]) == summary.clips_in
    assert sum(c.rows for c in again[1:]) == summary.rows
    assert run_generate(config).version == summary.version  # and without a hook, nothing to report to
