"""DuckDB and pyarrow.dataset over a committed local version's files (taken from the manifest),
and DuckDB over a version holding a long recording's segments."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf

from tests.support.datasets_support import LocalVersion
from tests.support.longform import SegmentedVersion, assert_recording_slice, segment_span, words_inside

duckdb = pytest.importorskip("duckdb")


def test_duckdb_queries_columns_and_json(local_version: LocalVersion) -> None:
    handle = local_version.handle()
    files = handle.shard_uris()
    reference = handle.to_arrow(["id", "dataset", "response", "labels", "duration_s"]).to_pylist()
    con = duckdb.connect()
    per_dataset = con.execute("SELECT dataset, count(*) FROM read_parquet(?) GROUP BY dataset", [files]).fetchall()
    assert dict(per_dataset) == dict(Counter(r["dataset"] for r in reference))
    responses = con.execute("SELECT id, response FROM read_parquet(?) ORDER BY id", [files]).fetchall()
    assert responses == sorted((r["id"], r["response"]) for r in reference)
    speakers = con.execute("""SELECT id, labels->>'speaker', json_extract_string(labels, '$.source'),
                                     json_type(labels) FROM read_parquet(?) ORDER BY id""", [files]).fetchall()
    want = sorted((r["id"], json.loads(r["labels"]).get("speaker"), json.loads(r["labels"]).get("source"))
                  for r in reference)
    assert [s[:3] for s in speakers] == want and {s[3] for s in speakers} == {"OBJECT"}
    assert any(s[1] is None for s in speakers) and any(s[1] for s in speakers)  # a key some rows lack
    missing = con.execute("SELECT count(*) FROM read_parquet(?) WHERE features.c50_db IS NULL", [files]).fetchone()
    assert missing == (10,)  # no C50 model in the demo config: a SQL NULL
    hours = con.execute("SELECT sum(duration_s) / 3600 FROM read_parquet(?)", [files]).fetchone()
    assert hours is not None and hours[0] == pytest.approx(sum(r["duration_s"] for r in reference) / 3600, rel=1e-6)


def test_pyarrow_dataset_filters_and_projects(local_version: LocalVersion) -> None:
    handle = local_version.handle()
    data = pads.dataset(handle.shard_uris(), format="parquet", schema=handle.schema)
    assert data.count_rows() == 10
    whole = handle.to_arrow(["id", "response", "transcript", "duration_s"])
    got = data.to_table(columns=["id", "response", "transcript", "duration_s"])
    assert got.to_pylist() == whole.to_pylist()  # manifest order, same values
    long = data.to_table(columns=["id"], filter=pads.field("duration_s") > 4.0).column("id").to_pylist()
    assert long == [r["id"] for r in whole.to_pylist() if r["duration_s"] > 4.0] and 0 < len(long) < 10
    no_text = data.to_table(columns=["id"], filter=pads.field("transcript").is_null()).column("id").to_pylist()
    assert no_text == [r["id"] for r in whole.to_pylist() if r["transcript"] is None] and no_text
    male = data.to_table(columns=["id"], filter=pads.field("features", "gender") == "male").num_rows
    assert male == sum(1 for r in handle.to_arrow(["features"]).to_pylist() if r["features"]["gender"] == "male")


def test_duckdb_segment_offsets_audio_and_words(segmented_version: SegmentedVersion, tmp_path: Path) -> None:
    """read_parquet over a version with segments: each segment's audio_offset_s is the start in its
    id (checked in SQL and per row), its audio bytes (from the materialised files: the shards keep
    only the clip name) decode to the recording's samples from there, its transcript is the words of
    the ffmpeg-written VTT's cues inside its span; the whole clip's offset is NULL."""
    handle = segmented_version.local.handle()
    rec, files = segmented_version.recording, handle.shard_uris()
    con = duckdb.connect()
    counts = con.execute(r"""SELECT count(*) FILTER (audio_offset_s IS NULL),
                                    count(*) FILTER (abs(audio_offset_s - TRY_CAST(regexp_extract(id, '@(\d+)-', 1)
                                                     AS DOUBLE) / 1000) < 1e-5), count(*)
                             FROM read_parquet(?)""", [files]).fetchone()
    assert counts is not None and counts[0] == 1 and counts[1] == counts[2] - 1 >= 3
    assert con.execute("SELECT count(audio.bytes) FROM read_parquet(?)", [files]).fetchone() == (0,)
    joined = handle.hf_data_files(materialize_to=tmp_path / "m")
    rows = con.execute("SELECT id, audio_offset_s, duration_s, audio.bytes, transcript FROM read_parquet(?) "
                       "ORDER BY id", [joined]).fetchall()
    assert len(rows) == counts[2]
    with_words = 0
    for row_id, offset, duration, data, transcript in rows:
        span = segment_span(row_id)
        if span is None:
            assert row_id == segmented_version.whole_id and offset is None
            continue
        assert np.float32(offset) == np.float32(span[0]), row_id
        audio, rate = sf.read(io.BytesIO(data), dtype="float32")
        assert_recording_slice(audio, rate, rec, offset, duration)
        assert transcript == (words_inside(rec, *span) or None), row_id
        with_words += transcript is not None
    assert with_words >= 3
