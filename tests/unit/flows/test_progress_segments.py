"""flows/progress.py: quarantined counts stay right when long recordings are cut into segments."""

from __future__ import annotations

from flows.progress import ProgressMeter


def test_quarantined_counts_segments_from_the_shard_outcomes() -> None:
    meter = ProgressMeter(clips_total=5, shards_total=1, clock=lambda: 0.0)
    # 5 planned clips, 2 of them recordings cut into 4 + 6 segments, 11 rows:
    # rows + quarantined = clips - recordings_cut + segments = 5 - 2 + 10 = 13 → 2 quarantined.
    meter.add(5, 11, shard=True, recordings_cut=2, segments=10, by_reason={"no_speech": 2})
    assert meter.quarantined == 2  # clips_done - rows would say -6
    fields = dict(meter.fields())
    assert fields["quarantined"] == "2" and fields["recordings cut"] == "2 → 10 segments"
    assert "recordings cut" not in dict(ProgressMeter(clips_total=1).fields())


def test_batches_without_cut_counts_never_show_a_negative_count() -> None:
    meter = ProgressMeter(clips_total=1, clock=lambda: 0.0)
    meter.add(1, 7)  # the terminal bar: one recording's seven segment rows
    assert meter.quarantined == 0 and "quarantined 0" in meter.postfix()
