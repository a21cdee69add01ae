import io
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from schemas.arrow import (
    QUARANTINE_SCHEMA,
    ROW_SCHEMA,
    quarantine_to_table,
    rows_to_table,
    schema_from_b64,
    schema_to_b64,
)
from schemas.records import (
    AudioRef,
    Features,
    Generation,
    Message,
    Provenance,
    QuarantineRow,
    ReasonCode,
    Row,
    Stage,
)


def make_row(clip_id: str = "d/a", **features: float | str | None) -> Row:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, dtype=np.float32), 16000, format="FLAC", subtype="PCM_16")
    return Row(id=clip_id, dataset="d", audio=AudioRef(bytes=buf.getvalue(), path="a.flac"), audio_uri="/x/a.wav",
               audio_sha256="0" * 64, sampling_rate=16000, duration_s=0.1, transcript=None, transcript_source=None,
               language=None, labels={"b": "2", "a": "1"}, features=Features(**features), attributes={"Gender": "Male"},
               seed_description="[00:00-00:01] (Gender: Male)", prompt="What can you hear from the audio?",
               messages=[Message(role="user", content="[00:00-00:01] (Gender: Male)\nWhat can you hear from the audio?")],
               response="A man.", generation=Generation(backend="template"),
               provenance=Provenance(pipeline_version="t", config_hash="h", bins_version="b", run_id="r",
                                     created_at=datetime(2026, 1, 1, tzinfo=UTC)))


def test_row_table_has_exact_schema_even_with_all_nulls() -> None:
    table = rows_to_table([make_row()])
    assert table.schema.equals(ROW_SCHEMA, check_metadata=True)
    assert table.column("features").type == ROW_SCHEMA.field("features").type
    assert table.column("features")[0]["pitch_mean_hz"].as_py() is None


def test_maps_are_sorted_json_so_equal_rows_give_equal_bytes() -> None:
    a = rows_to_table([make_row()])
    assert a.column("labels")[0].as_py() == '{"a": "1", "b": "2"}'
    assert a.equals(rows_to_table([make_row()]))


def test_row_schema_carries_hf_audio_feature() -> None:
    meta = json.loads(ROW_SCHEMA.metadata[b"huggingface"])
    assert meta["info"]["features"]["audio"] == {"sampling_rate": 16000, "_type": "Audio"}
    assert meta["info"]["features"]["labels"] == {"_type": "Json"}
    first_six = [f.name for f in ROW_SCHEMA][:2] + ["seed_description", "prompt", "response", "messages"]
    assert all(name in ROW_SCHEMA.names for name in first_six)


def test_wrong_types_are_rejected_not_coerced() -> None:
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        pa.Table.from_pylist([{"id": "x", "dataset": "d", "duration_s": "long"}], schema=ROW_SCHEMA)


def test_quarantine_table_and_schema_roundtrip() -> None:
    q = quarantine_to_table([QuarantineRow(id="d/x", dataset="d", audio_uri="/x", stage=Stage.audio,
                                           reason_code=ReasonCode.too_long, message="41 s")])
    assert q.schema.equals(QUARANTINE_SCHEMA)
    assert q.column("reason_code").to_pylist() == ["too_long"]
    assert schema_from_b64(schema_to_b64(ROW_SCHEMA)).equals(ROW_SCHEMA, check_metadata=True)


def _spans_row() -> Row:
    from schemas.records import Segment

    spans = [Segment(start_s=0.0, end_s=1.5, text="hi", speaker="a", labels={"speaker": "a", "act": "greet"},
                     attributes={"Gender": "Male", "Act": "greet"}),
             Segment(start_s=1.5, end_s=3.0, text="yes", speaker="b", labels={"speaker": "b"},
                     attributes={"Gender": "Female"})]
    return make_row("d/multi").model_copy(update={
        "segments": spans, "attributes": {"Gender": "Male, Female", "Act": "greet"},
        "attribute_sources": {"Gender": "labels.gender", "Act": "labels.act"}})


def test_attribute_sources_and_span_fields_are_sorted_json() -> None:
    table = rows_to_table([_spans_row(), make_row()])
    assert table.schema.equals(ROW_SCHEMA, check_metadata=True)
    assert table.column("attribute_sources").to_pylist() == ['{"Act": "labels.act", "Gender": "labels.gender"}', "{}"]
    first = table.column("segments")[0].as_py()
    assert [s["speaker"] for s in first] == ["a", "b"]
    assert first[0]["labels"] == '{"act": "greet", "speaker": "a"}'
    assert json.loads(first[1]["attributes"]) == {"Gender": "Female"}
    assert table.column("segments")[1].as_py() == []
    feats = json.loads(ROW_SCHEMA.metadata[b"huggingface"])["info"]["features"]
    assert feats["attribute_sources"] == {"_type": "Json"}
    assert feats["segments"]["feature"]["attributes"] == {"_type": "Json"}
    assert feats["segments"]["feature"]["speaker"] == {"dtype": "string", "_type": "Value"}


def test_versions_written_before_attribute_sources_still_read(tmp_path: Path) -> None:
    """A version committed with the previous row schema (no attribute_sources, text-only segments) reads
    through the consumer API next to a new one: readers follow each version's own manifest schema."""
    from schemas.arrow import hf_features
    from schemas.manifest import Stats
    from storage.objectstore import open_store
    from storage.reader import open_dataset
    from storage.shards import write_parquet_shard
    from storage.versions import commit_version

    old_segment = pa.struct([pa.field("start_s", pa.float32()), pa.field("end_s", pa.float32()),
                             pa.field("text", pa.string())])
    old_fields = [f.with_type(pa.list_(old_segment)) if f.name == "segments" else f
                  for f in ROW_SCHEMA if f.name != "attribute_sources"]
    old_schema = pa.schema(old_fields, metadata={
        b"huggingface": json.dumps({"info": {"features": hf_features(old_fields)}}).encode()})
    new = rows_to_table([_spans_row()])
    old = new.drop_columns(["attribute_sources"]).set_column(
        new.schema.get_field_index("segments"), "segments",
        pa.array([[{"start_s": 0.0, "end_s": 1.5, "text": "hi"}]], type=pa.list_(old_segment)))
    old = old.cast(old_schema)
    store = open_store(str(tmp_path))
    lineage = {"run_id": "r", "code_version": "t", "config_hash": "h", "bins_version": "b", "prompt_pool_hash": "p"}
    for table in (old, new):
        shard = write_parquet_shard(store, f"_staging/x/{len(table.schema)}.parquet", table)
        commit_version(store, dataset="d", staged_shards=[shard], staged_quarantine=[], lineage=lineage,
                       stats=Stats(clips_in=1, rows=1, quarantined=0), arrow_schema_b64=schema_to_b64(table.schema),
                       hf_features=hf_features(list(table.schema)))
    before, after = open_dataset(f"{tmp_path}/d@v0001"), open_dataset(f"{tmp_path}/d@v0002")
    assert before.verify().ok and after.verify().ok
    assert "attribute_sources" not in before.schema.names and "attribute_sources" in after.schema.names
    old_row = next(iter(before.torch_dataset()))
    assert old_row["segments"] == [{"start_s": 0.0, "end_s": 1.5, "text": "hi"}]
    assert old_row["attributes"] == {"Act": "greet", "Gender": "Male, Female"}
    new_row = next(iter(after.torch_dataset()))
    assert new_row["attribute_sources"] == {"Act": "labels.act", "Gender": "labels.gender"}
    assert new_row["segments"][1]["attributes"] == {"Gender": "Female"}
    assert before.to_arrow(columns=["id", "segments"]).num_rows == 1
