import io
import json
from datetime import UTC, datetime

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
