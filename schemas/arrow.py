"""Explicit Arrow schemas for dataset rows and quarantine rows, and the record → table conversion.

The schema is declared here, never inferred from a batch: a None in the first rows or a resumed
shard must produce byte-compatible files. The `huggingface` schema metadata makes
`datasets.load_dataset("parquet", ...)` decode the `audio` column as `Audio`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from schemas.records import Features, QuarantineRow, Row

SAMPLING_RATE = 16_000
# Bumped when ROW_SCHEMA gains a column: staged shards of an older one are redone, never committed
# under the new schema (2: audio_offset_s). Committed versions keep the schema in their manifest.
ROW_SCHEMA_VERSION = 2

_STR = pa.string()
_F32 = pa.float32()

_FEATURE_TYPES: dict[str, pa.DataType] = {
    name: (_STR if field.annotation == (str | None) else _F32) for name, field in Features.model_fields.items()
}

FEATURES_TYPE = pa.struct([pa.field(name, t, nullable=True) for name, t in _FEATURE_TYPES.items()])
AUDIO_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", _STR)])
MESSAGE_TYPE = pa.struct([pa.field("role", _STR), pa.field("content", _STR)])
# String→string dicts (labels, attributes, versions) are Arrow `json` (Parquet JSON logical type):
# `datasets` cannot read Arrow maps, but decodes `json` to dicts; DuckDB reads it as JSON.
STR_MAP = pa.json_()
# Whisper segments carry text only; the spans of a multi-speaker clip also their speaker, corpus
# labels and seed attributes.
SEGMENT_TYPE = pa.struct([pa.field("start_s", _F32), pa.field("end_s", _F32), pa.field("text", _STR),
                          pa.field("speaker", _STR), pa.field("labels", STR_MAP), pa.field("attributes", STR_MAP)])

GENERATION_TYPE = pa.struct(
    [
        pa.field("backend", _STR),
        pa.field("model", _STR),
        pa.field("revision", _STR),
        pa.field("temperature", _F32),
        pa.field("top_p", _F32),
        pa.field("max_tokens", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("finish_reason", _STR),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("latency_s", _F32),
    ]
)
PROVENANCE_TYPE = pa.struct(
    [
        pa.field("pipeline_version", _STR),
        pa.field("config_hash", _STR),
        pa.field("bins_version", _STR),
        pa.field("extractor_versions", STR_MAP),
        pa.field("run_id", _STR),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _hf_value(arrow_type: pa.DataType) -> dict[str, Any]:
    """The `datasets` feature JSON for one Arrow type (only the types our schema uses)."""
    if pa.types.is_struct(arrow_type):
        return {f.name: _hf_value(f.type) for f in arrow_type}
    if arrow_type == STR_MAP:
        return {"_type": "Json"}
    if pa.types.is_list(arrow_type):
        return {"feature": _hf_value(arrow_type.value_type), "_type": "List"}
    if pa.types.is_timestamp(arrow_type):
        return {"dtype": f"timestamp[{arrow_type.unit}, tz={arrow_type.tz}]", "_type": "Value"}
    return {"dtype": _HF_DTYPES[arrow_type], "_type": "Value"}


_HF_DTYPES: dict[pa.DataType, str] = {
    pa.string(): "string",
    pa.binary(): "binary",
    pa.float32(): "float32",
    pa.int32(): "int32",
    pa.int64(): "int64",
}

_ROW_FIELDS: list[pa.Field] = [
    pa.field("id", _STR, nullable=False),
    pa.field("dataset", _STR, nullable=False),
    pa.field("audio", AUDIO_TYPE),
    pa.field("audio_uri", _STR),
    pa.field("audio_sha256", _STR),
    pa.field("sampling_rate", pa.int32()),
    pa.field("duration_s", _F32),
    pa.field("audio_offset_s", _F32),  # null for whole-file clips; absent from versions before segments
    pa.field("transcript", _STR),
    pa.field("transcript_source", _STR),
    pa.field("language", _STR),
    pa.field("segments", pa.list_(SEGMENT_TYPE)),
    pa.field("labels", STR_MAP),
    pa.field("features", FEATURES_TYPE),
    pa.field("attributes", STR_MAP),
    pa.field("attribute_sources", STR_MAP),
    pa.field("seed_description", _STR),
    pa.field("prompt", _STR),
    pa.field("messages", pa.list_(MESSAGE_TYPE)),
    pa.field("rendered_prompt", _STR),
    pa.field("response", _STR),
    pa.field("generation", GENERATION_TYPE),
    pa.field("provenance", PROVENANCE_TYPE),
]


def hf_features(fields: Sequence[pa.Field] = tuple(_ROW_FIELDS)) -> dict[str, Any]:
    """HF `datasets` features for the row schema; `audio` is declared as `Audio` at 16 kHz."""
    feats = {f.name: _hf_value(f.type) for f in fields}
    feats["audio"] = {"sampling_rate": SAMPLING_RATE, "_type": "Audio"}
    return feats


ROW_SCHEMA: pa.Schema = pa.schema(
    _ROW_FIELDS,
    metadata={b"huggingface": json.dumps({"info": {"features": hf_features()}}).encode()},
)

QUARANTINE_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("id", _STR, nullable=False),
        pa.field("dataset", _STR, nullable=False),
        pa.field("audio_uri", _STR),
        pa.field("stage", _STR, nullable=False),
        pa.field("reason_code", _STR, nullable=False),
        pa.field("message", _STR),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _row_dict(row: Row) -> dict[str, Any]:
    d = row.model_dump(mode="python")
    # Sorted keys so identical rows give identical bytes.
    for key in ("labels", "attributes", "attribute_sources"):
        d[key] = _json_text(d[key])
    for seg in d["segments"]:
        seg["labels"], seg["attributes"] = _json_text(seg["labels"]), _json_text(seg["attributes"])
    d["provenance"]["extractor_versions"] = _json_text(d["provenance"]["extractor_versions"])
    return d


def _json_text(mapping: dict[str, str]) -> str:
    return json.dumps(mapping, sort_keys=True, ensure_ascii=False)


def _storage_type(t: pa.DataType) -> pa.DataType:
    """The same type with `json` replaced by its string storage (what `from_pylist` can build)."""
    if t == STR_MAP:
        return _STR
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_storage_type(f.type)) for f in t])
    if pa.types.is_list(t):
        return pa.list_(_storage_type(t.value_type))
    return t


def _storage_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(_storage_type(f.type)) for f in schema], metadata=schema.metadata)


_ROW_STORAGE_SCHEMA = _storage_schema(ROW_SCHEMA)


def rows_to_table(rows: Iterable[Row]) -> pa.Table:
    """Rows → table with exactly ROW_SCHEMA (raises if a record does not fit it)."""
    table = pa.Table.from_pylist([_row_dict(r) for r in rows], schema=_ROW_STORAGE_SCHEMA)
    return table.cast(ROW_SCHEMA)


def quarantine_to_table(rows: Iterable[QuarantineRow]) -> pa.Table:
    return pa.Table.from_pylist([r.model_dump(mode="json") | {"created_at": r.created_at} for r in rows],
                                schema=QUARANTINE_SCHEMA)


def schema_to_b64(schema: pa.Schema) -> str:
    """Serialized schema for the manifest (round-trips with `schema_from_b64`)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_b64(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))
