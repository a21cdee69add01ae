"""The committed-version manifest and the refs that point at versions.

A version is visible only once its manifest exists; readers go through the manifest and never
list prefixes, so this model is the whole consumer-facing contract of a version.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from schemas.records import utc_now


class ShardInfo(BaseModel):
    # Manifest layout 1: relative to the version prefix (data/train-00000-of-00004.parquet); layout 2:
    # the root-relative data key (<dataset>/data/<run-id>/train-00000-<sha>.parquet). Resolve it with
    # storage.versions.file_key, never by hand.
    path: str
    rows: int
    bytes: int
    sha256: str
    # Audio stored once (layout 2): the row shard's `audio` column holds the file name with null bytes,
    # and this audio file (root-relative key; `id`, `audio` columns, a superset of the shard's ids)
    # holds the bytes, shared by every run and version whose shard measured the same clips.
    # None: the shard carries its audio itself. Readers join it through storage.audio_files.
    audio: ShardInfo | None = None


class FileInfo(BaseModel):
    """A version's non-Parquet file (its config record), checksummed like a shard."""

    path: str  # relative to the version prefix, e.g. config.yaml
    bytes: int
    sha256: str


class ModelInfo(BaseModel):
    role: str  # e.g. "llm", "asr", "gender"
    name: str
    revision: str | None = None


class Lineage(BaseModel):
    dataset: str
    version: str
    parent: str | None = None
    # Versions this one references shards of, "DATASET@vNNNN" (a composed version, or a run's
    # `output.base`); `parent` stays the previous version of this dataset.
    parents: list[str] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utc_now)
    flow_run_id: str | None = None
    run_id: str
    code_version: str
    config_hash: str
    bins_version: str
    models: list[ModelInfo] = Field(default_factory=list)
    sampling: dict[str, Any] = Field(default_factory=dict)
    prompt_pool_hash: str
    extractor_versions: dict[str, str] = Field(default_factory=dict)


class Stats(BaseModel):
    clips_in: int
    rows: int
    quarantined: int
    quarantine_by_reason: dict[str, int] = Field(default_factory=dict)
    audio_hours: float = 0.0
    rows_without_transcript: int = 0  # rows whose seed has labels only (no corpus or Whisper text)
    # Long recordings cut into segments: each recording counts once in clips_in, its segments each
    # as a row or quarantine row (rows + quarantined = clips_in - recordings_cut + segments).
    recordings_cut: int = 0
    segments: int = 0
    # Every QC failure by rule, regenerated ones included (how often the LLM needed a second try).
    qc_failures: dict[str, int] = Field(default_factory=dict)
    attribute_counts: dict[str, dict[str, int]] = Field(default_factory=dict)


class Manifest(BaseModel):
    format: str = "speechpairs/manifest@1"
    # Where shard paths point: 1 (absent in older manifests) = copies inside the version prefix;
    # 2 = root-relative data keys written once by the shard tasks and only referenced by the commit.
    layout: int = 1
    lineage: Lineage
    stats: Stats
    shards: list[ShardInfo]
    quarantine: list[ShardInfo] = Field(default_factory=list)
    arrow_schema: str  # base64 of the serialized Arrow schema (pyarrow.ipc)
    hf_features: dict[str, Any] = Field(default_factory=dict)
    # The resolved run config (config.yaml, secrets redacted); None for versions committed before
    # configs were recorded.
    config: FileInfo | None = None


class Ref(BaseModel):
    """Content of refs/<name>.json: a movable name for a committed version."""

    version: str
    updated_at: datetime = Field(default_factory=utc_now)
