"""Pydantic records that cross stage boundaries: clips in, features, rows and quarantine out.

Every stage takes and returns these, so a stage can be tested alone and its output checked
against the Arrow schema in `schemas.arrow` before anything is written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.attributes import SeedLabel


def utc_now() -> datetime:
    return datetime.now(UTC)


class Stage(str, Enum):
    """Where in the flow a clip was stopped."""

    ingest = "ingest"
    audio = "audio"
    features = "features"
    asr = "asr"
    classify = "classify"
    describe = "describe"
    llm = "llm"
    write = "write"


class ReasonCode(str, Enum):
    """Named quarantine reasons; the dataset card and run summary count by these."""

    missing_file = "missing_file"
    unreadable = "unreadable"
    empty = "empty"
    too_short = "too_short"
    too_long = "too_long"
    silent = "silent"
    non_finite = "non_finite"
    bad_row = "bad_row"
    duplicate_id = "duplicate_id"
    multi_speaker = "multi_speaker"  # several speakers' supervisions in one clip, with multi_speaker: quarantine
    feature_error = "feature_error"
    describe_error = "describe_error"
    asr_error = "asr_error"
    asr_hallucination = "asr_hallucination"
    classifier_error = "classifier_error"
    llm_error = "llm_error"
    llm_empty = "llm_empty"
    # Transient: the clip is fine, a service was not (see TRANSIENT_REASONS).
    llm_unavailable = "llm_unavailable"
    storage_error = "storage_error"
    # Hostile or misplaced input: a FIFO/device/link that is no file, a file above audio.max_file_bytes,
    # a path that leads outside the source's root and sources[].allowed_roots.
    not_a_file = "not_a_file"
    too_large = "too_large"
    path_outside_root = "path_outside_root"
    # Response QC (a response that still fails after the allowed regenerations): one per rule.
    qc_empty = "qc_empty"
    qc_refusal = "qc_refusal"
    qc_truncated = "qc_truncated"
    qc_too_short = "qc_too_short"
    qc_too_long = "qc_too_long"
    qc_leaks_seed = "qc_leaks_seed"
    qc_contradicts_seed = "qc_contradicts_seed"
    qc_wrong_language = "qc_wrong_language"
    qc_format = "qc_format"
    qc_injection = "qc_injection"
    # Audio content and corpus text (hostile input): no speech in a speech corpus, samples far beyond
    # full scale, a transcript longer than describe.max_transcript_chars.
    no_speech = "no_speech"
    out_of_range = "out_of_range"
    transcript_too_long = "transcript_too_long"


# Reasons that say nothing about the clip: a re-run of the same config retries these clips, and a
# version is not committed with them (beyond `output.max_transient_ratio`), so an outage is never
# frozen into a dataset.
TRANSIENT_REASONS: frozenset[ReasonCode] = frozenset({ReasonCode.llm_unavailable, ReasonCode.storage_error})


class Clip(BaseModel):
    """One input clip as ingest found it: where the audio is and what the corpus says about it."""

    model_config = ConfigDict(frozen=True)

    id: str
    dataset: str
    audio_uri: str
    transcript: str | None = None
    language: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    # Embedded audio (e.g. a Hugging Face Parquet `audio` column); None = read `audio_uri`.
    audio_bytes: bytes | None = Field(default=None, repr=False)
    # Set when ingest already knows the row is unusable (e.g. a manifest row without a path):
    # the clip then goes straight to quarantine with this reason and message.
    ingest_error: tuple[ReasonCode, str] | None = None
    # Corpus labels that go into the seed after the canonical attributes (the adapter's default,
    # or the source's `seed_labels`).
    seed_labels: list[SeedLabel] = Field(default_factory=list)
    # Two or more timed supervisions inside the clip (a lhotse cut), in time order, each with its
    # own text, speaker and labels: the seed then gets one span per supervision.
    spans: list[Segment] = Field(default_factory=list)
    # False for a clip of a `sources[].speech: false` source (sound, music): labels-only seed, and
    # the VAD never quarantines it as `no_speech`.
    speech: bool = True
    # A segment cut from a long recording (tasks/segment/clips.py): its start in the recording
    # (`audio_uri`), seconds; its samples travel in `audio_bytes`. None for a whole-file clip.
    offset_s: float | None = None
    # A clip-list row's timestamped transcript (SRT, TextGrid, …) for cutting the recording's text.
    timestamps_uri: str | None = None


class Features(BaseModel):
    """Measured values for one clip. Every field is nullable: an extractor may not apply."""

    duration_s: float | None = None
    speech_duration_s: float | None = None
    voiced_ratio: float | None = None
    pitch_mean_hz: float | None = None
    pitch_std_hz: float | None = None
    loudness_lufs: float | None = None
    rms_dbfs: float | None = None
    peak_dbfs: float | None = None
    clipping_ratio: float | None = None
    snr_db: float | None = None
    c50_db: float | None = None
    speaking_rate_wps: float | None = None
    speaking_rate_sps: float | None = None
    speaking_rate_pps: float | None = None
    gender: str | None = None
    gender_score: float | None = None
    gender_source: str | None = None
    emotion: str | None = None
    emotion_score: float | None = None
    emotion_source: str | None = None
    age: str | None = None
    age_score: float | None = None
    age_source: str | None = None
    accent: str | None = None
    accent_score: float | None = None
    accent_source: str | None = None
    asr_no_speech_prob: float | None = None
    asr_avg_logprob: float | None = None
    asr_compression_ratio: float | None = None


class Segment(BaseModel):
    """A timed piece of the clip, for timestamped seed descriptions: a Whisper segment (text only), or
    one supervision of a multi-speaker clip with its speaker, corpus labels and seed attributes."""

    start_s: float
    end_s: float
    text: str
    speaker: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    attributes: dict[str, str] = Field(default_factory=dict)


class AudioRef(BaseModel):
    """HF `Audio` storage layout: encoded bytes plus a file name hint (bytes None in a row shard whose
    audio lives in its audio file: storage/audio_files.py joins them back)."""

    bytes: bytes | None
    path: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Generation(BaseModel):
    """How the response was produced, so any row can be regenerated or audited."""

    backend: str
    model: str | None = None
    revision: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int = 1
    latency_s: float | None = None


class Provenance(BaseModel):
    pipeline_version: str
    config_hash: str
    bins_version: str
    extractor_versions: dict[str, str] = Field(default_factory=dict)
    run_id: str
    created_at: datetime = Field(default_factory=utc_now)


class Row(BaseModel):
    """One speech-text pair: the dataset's row contract (see ARCHITECTURE.md)."""

    id: str
    dataset: str
    audio: AudioRef
    audio_uri: str
    audio_sha256: str
    sampling_rate: int
    duration_s: float
    # Where in `audio_uri` the clip starts (a segment of a long recording); None = the whole file.
    audio_offset_s: float | None = None
    transcript: str | None
    transcript_source: str | None
    language: str | None
    segments: list[Segment] = Field(default_factory=list)
    labels: dict[str, str]
    features: Features
    attributes: dict[str, str]
    # Display name → where its words came from: `labels.<column>`, `features.<field>`,
    # `classifier:<model>`, `pitch_heuristic` (several, comma-separated, for a multi-span seed).
    attribute_sources: dict[str, str] = Field(default_factory=dict)
    seed_description: str
    prompt: str
    messages: list[Message]
    # The exact text the model saw when the chat template was rendered on our side (completion
    # prompts, in-process backends); None when the server applied its own template to `messages`.
    rendered_prompt: str | None = None
    response: str
    generation: Generation
    provenance: Provenance


class QuarantineRow(BaseModel):
    id: str
    dataset: str
    audio_uri: str
    stage: Stage
    reason_code: ReasonCode
    message: str
    created_at: datetime = Field(default_factory=utc_now)


class QuarantineError(Exception):
    """Raised by a per-clip stage to send that clip (not the shard) to quarantine."""

    def __init__(self, stage: Stage, reason: ReasonCode, message: str) -> None:
        super().__init__(f"{stage.value}/{reason.value}: {message}")
        self.stage = stage
        self.reason = reason
        self.message = message
