"""RunConfig: the one pydantic model a run is described by (YAML file + `--set` + environment).

Validation happens before any work: an unknown key or a bad value fails with the dotted key
and the allowed values, never halfway through a corpus.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.attributes import SeedLabel, check_seed_labels

ENV_PREFIX = "SPEECHPAIRS__"

DEFAULT_INSTRUCTION = "What can you hear from the audio?"
DEFAULT_ATTRIBUTES = ["gender", "emotion", "age", "accent", "pitch", "speed", "volume", "noise"]


class _Strict(BaseModel):
    # Inputs stay out of error texts: a refused URL may hold a password, and Prefect logs (and stores)
    # the validation errors of flow parameters. `_format_errors` quotes only literal choices.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")


def refuse_userinfo(url: str | None, fix: str) -> str | None:
    """A URL carrying `user:password@` is refused: the config is printed, logged and stored with the
    run (Prefect flow parameters, manifests), so a secret there would leak everywhere. The error
    never repeats the URL."""
    if url is not None and _USERINFO.match(url.strip()):
        raise ValueError("credentials inside the URL are not accepted (they would be printed, "
                         f"logged and stored with the run); remove `user:password@` and {fix}")
    return url


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SourceS3Config(_Strict):
    """A corpus in another S3 store than the run's `s3` block: unset fields fall back to that block.
    Keys never live in the config: name a Prefect block, an AWS profile, or the environment
    variables that hold them (their names are logged, never their values)."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] | None = None
    credentials_block: str | None = Field(default=None, description="Name of a Prefect AwsCredentials block.")
    profile: str | None = Field(default=None, description="An AWS profile (~/.aws/config) for this source.")
    access_key_id_env: str | None = Field(default=None, description="Name of the environment variable holding "
                                          "this source's access key id (with secret_access_key_env).")
    secret_access_key_env: str | None = Field(default=None, description="Name of the environment variable "
                                              "holding this source's secret key.")
    session_token_env: str | None = Field(default=None, description="Name of the environment variable holding "
                                          "a session token, if any.")

    @field_validator("endpoint_url")
    @classmethod
    def _no_secret_in_url(cls, value: str | None) -> str | None:
        return refuse_userinfo(value, "name the environment variables holding the keys "
                               "(access_key_id_env / secret_access_key_env), a profile or a credentials_block")

    @field_validator("access_key_id_env", "secret_access_key_env", "session_token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("give the NAME of an environment variable (letters, digits, '_'), never a key itself")
        return value

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> SourceS3Config:
        if bool(self.access_key_id_env) != bool(self.secret_access_key_env):
            raise ValueError("set access_key_id_env and secret_access_key_env together")
        return self


class SourceConfig(_Strict):
    """One corpus to read. `kind: auto` picks manifest for a file and folder for a directory."""

    kind: Literal["auto", "manifest", "folder", "lhotse", "hf_parquet", "librispeech", "libritts", "vctk",
                  "commonvoice", "cremad", "esd"] = "auto"
    path: str = Field(description="Local path, s3:// URI (any kind) or http(s):// URL (a manifest) of the corpus.")
    s3: SourceS3Config | None = Field(
        default=None, description="Endpoint/region/credentials for an s3:// source in another store than the "
        "run's `s3` block (unset fields fall back to that block).")
    dataset: str | None = Field(default=None, description="Corpus name written to rows; default: file/folder stem.")
    language: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="Labels added to every clip of this source.")
    seed_labels: list[SeedLabel] | None = Field(
        default=None, description="Corpus labels written into the seed verbatim, after describe.attributes, in "
        "this order: 'act', 'act: Dialogue act' or {label, as, values}; unset = the adapter's default "
        "(README 'Input layouts'), [] = none.")
    multi_speaker: Literal["spans", "quarantine"] = Field(
        default="spans", description="A clip holding supervisions of several speakers (lhotse cuts): one "
        "[start-end] span per supervision in the seed, or quarantine it as multi_speaker.")
    allowed_roots: list[str] = Field(
        default_factory=list, description="Folders (or s3:// prefixes) outside the source's own root that its "
        "audio paths may point into (e.g. where lhotse recordings live); relative to the config file. "
        "Anything else is quarantined as path_outside_root.")
    speech: bool = Field(
        default=True, description="false: a non-speech corpus (sound, music): its clips are never quarantined "
        "as no_speech, get no transcript or Whisper, and a labels-only seed without voice attributes.")

    segment: SourceSegmentConfig | None = Field(
        default=None, description="Overrides of the run's `segment` block for this source (fields given here "
        "win; e.g. {mode: always} for a source of long recordings, {mode: never} to keep `too_long`).")

    _run_s3: S3Config | None = PrivateAttr(default=None)  # the run's `s3` block, bound by RunConfig

    @field_validator("seed_labels")
    @classmethod
    def _seed_labels(cls, value: list[SeedLabel] | None) -> list[SeedLabel] | None:
        return None if value is None else check_seed_labels(value)

    @field_validator("path")
    @classmethod
    def _no_secret_in_path(cls, value: str) -> str:
        refuse_userinfo(value, "serve the corpus without credentials in the URL, or put it on S3 with sources[].s3")
        return value

    @property
    def run_s3(self) -> S3Config | None:
        """The run's `s3` block (what an s3:// source uses where `sources[].s3` sets nothing)."""
        return self._run_s3

    def bind_run_s3(self, s3: S3Config) -> None:
        self._run_s3 = s3


class AudioConfig(_Strict):
    sampling_rate: Literal[16000] = 16000
    min_duration_s: float = Field(default=0.3, gt=0)
    max_duration_s: float = Field(default=30.0, gt=0)
    silence_dbfs: float = Field(default=-60.0, description="Peak level below which a clip is `silent`.")
    clip_level: float = Field(default=0.999, gt=0, le=1.0, description="|sample| at or above this counts as clipped.")
    max_file_bytes: int = Field(default=2 * 1024**3, gt=0, description="A source file larger than this is "
                                "quarantined as too_large before it is read.")
    min_speech_s: float = Field(default=0.2, ge=0, description="Less speech than this (VAD seconds) in a clip of "
                                "a speech source is `no_speech`; 0 = never.")
    max_peak: float = Field(default=4.0, gt=1.0, description="|sample| above this (4.0 = +12 dBFS) is "
                            "`out_of_range`: float files may exceed full scale a little, not by orders of magnitude.")

    @model_validator(mode="after")
    def _order(self) -> AudioConfig:
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError("audio.min_duration_s must be smaller than audio.max_duration_s")
        return self


class SegmentConfig(_Strict):
    """How a long recording becomes clips (tasks/segment): speech regions from a VAD, cut at the
    longest pauses into segments of min_s..max_s (DeSTA2 caps clips at 30 s). `auto` segments
    recordings longer than audio.max_duration_s, `always` every recording, `never` none (a long
    one stays `too_long`). max_s should not exceed audio.max_duration_s (checked where wired)."""

    mode: Literal["auto", "always", "never"] = "auto"
    min_s: float = Field(default=2.0, gt=0, description="Shorter pieces join a neighbour or are dropped.")
    max_s: float = Field(default=30.0, gt=0, description="Longer speech is cut at its longest pauses.")
    pad_s: float = Field(default=0.15, ge=0, le=1.0, description="Silence kept on each side of a segment "
                         "(never past the middle of the pause to the next one).")
    vad: Literal["auto", "silero", "energy"] = Field(default="auto", description="auto: Silero VAD when "
                                                     "the silero-vad package is installed, else the energy VAD.")
    threshold: float = Field(default=0.5, gt=0, lt=1, description="Silero speech probability that starts speech.")
    min_silence_s: float = Field(default=0.1, ge=0, le=5.0, description="Shorter pauses stay inside speech.")
    min_speech_s: float = Field(default=0.25, ge=0, le=5.0, description="Shorter speech islands are ignored.")
    block_s: float = Field(default=30.0, ge=1.0, le=600.0, description="Seconds decoded at a time (memory bound).")

    @model_validator(mode="after")
    def _order(self) -> SegmentConfig:
        if self.min_s >= self.max_s:
            raise ValueError(f"segment.min_s ({self.min_s}) must be smaller than segment.max_s ({self.max_s})")
        if 2 * self.pad_s >= self.min_s:
            raise ValueError(f"segment.pad_s ({self.pad_s}) must be under half of segment.min_s ({self.min_s})")
        return self


class SourceSegmentConfig(_Strict):
    """`sources[].segment`: the fields of the run's `segment` block this source sets differently."""

    mode: Literal["auto", "always", "never"] | None = None
    min_s: float | None = Field(default=None, gt=0)
    max_s: float | None = Field(default=None, gt=0)
    pad_s: float | None = Field(default=None, ge=0, le=1.0)
    vad: Literal["auto", "silero", "energy"] | None = None
    threshold: float | None = Field(default=None, gt=0, lt=1)
    min_silence_s: float | None = Field(default=None, ge=0, le=5.0)
    min_speech_s: float | None = Field(default=None, ge=0, le=5.0)
    block_s: float | None = Field(default=None, ge=1.0, le=600.0)

    def over(self, base: SegmentConfig) -> SegmentConfig:
        """`base` with the fields set here replacing its own (validated again as a whole)."""
        return SegmentConfig.model_validate(base.model_dump() | self.model_dump(exclude_none=True))


Device = Literal["auto", "cpu", "cuda"]


class ASRConfig(_Strict):
    """Whisper transcripts for clips that have none (openai-whisper, `models` extra)."""

    enabled: bool = False
    model: str = Field(default="auto", description="Whisper name (small, large-v3, …) or a local checkpoint "
                                                   "path; auto = large-v3 on GPU, small on CPU.")
    download_root: str | None = Field(default=None, description="Whisper's model cache directory.")
    device: Device = "auto"
    batch_size: int = Field(default=16, ge=1, le=512)
    language: str | None = Field(default=None, description="Force a language; None = detect per clip.")
    no_speech_threshold: float = Field(default=0.6, ge=0, le=1)
    logprob_threshold: float = Field(default=-1.0, le=0)
    compression_ratio_threshold: float = Field(default=2.4, gt=0)
    on_hallucination: Literal["quarantine", "flag"] = Field(
        default="quarantine", description="quarantine the clip, or keep it without a transcript (flag).")


class ClassifierConfig(_Strict):
    """One transformers audio-classification model for one attribute."""

    attribute: Literal["gender", "emotion", "age", "accent"]
    model: str = Field(description="Hugging Face model id or local directory.")
    revision: str | None = None
    device: Device = "auto"
    batch_size: int = Field(default=16, ge=1, le=1024)
    label_map: dict[str, str] = Field(default_factory=dict, description="Model label → canonical word.")
    min_score: float = Field(default=0.5, ge=0, le=1, description="Below this the attribute is left out of the seed.")


class FeaturesConfig(_Strict):
    pitch_fmin_hz: float = Field(default=60.0, gt=0)
    pitch_fmax_hz: float = Field(default=500.0, gt=0)
    gender_from_pitch: bool = Field(default=True, description="Fallback gender from pitch when no corpus label.")
    phoneme_rate: bool = Field(default=True, description="Phonemes/s from the transcript (phonemizer + espeak-ng).")
    asr: ASRConfig = Field(default_factory=ASRConfig)
    classifiers: list[ClassifierConfig] = Field(default_factory=list)

    @field_validator("classifiers")
    @classmethod
    def _one_per_attribute(cls, value: list[ClassifierConfig]) -> list[ClassifierConfig]:
        seen = [c.attribute for c in value]
        dup = sorted({a for a in seen if seen.count(a) > 1})
        if dup:
            raise ValueError(f"one classifier per attribute; repeated: {dup}")
        return value


class DescribeConfig(_Strict):
    format: Literal["desta2", "desta25"] = "desta25"
    attributes: list[str] = Field(default_factory=lambda: list(DEFAULT_ATTRIBUTES))
    bins: str | None = Field(default=None, description="Path of a bins JSON; default: the shipped bins.")
    instruction: str = DEFAULT_INSTRUCTION
    instruction_pool: str | None = Field(default=None, description="Text file, one instruction a line.")
    segment_timestamps: bool = Field(default=False, description="One [start-end] span per Whisper segment.")
    max_transcript_chars: int = Field(default=2000, ge=1, description="A longer transcript (corpus or Whisper) "
                                      "is quarantined `transcript_too_long` before any processing.")
    seed: int = 0

    @field_validator("attributes")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from schemas.attributes import KNOWN_ATTRIBUTES  # local: keeps the import graph flat

        bad = [a for a in value if a not in KNOWN_ATTRIBUTES]
        if bad:
            raise ValueError(f"unknown attribute(s) {bad}; allowed: {sorted(KNOWN_ATTRIBUTES)}")
        return value


QCRule = Literal["empty", "refusal", "truncated", "too_short", "too_long", "leaks_seed", "contradicts_seed",
                 "wrong_language", "format", "injection"]


class QCConfig(_Strict):
    """Response quality control: named rules; a failed response is regenerated, then quarantined."""

    enabled: bool = True
    rules: list[QCRule] = Field(default_factory=lambda: list(get_args(QCRule)))
    min_words: int = Field(default=3, ge=0)
    max_words: int = Field(default=400, ge=1)
    language: str | None = Field(default="en", description="Expected response language; None = any.")
    max_regenerations: int = Field(default=2, ge=0, le=20, description="New-seed retries before quarantine.")


# Backends renamed since versions were first made → their current name. The old name still loads,
# and the config hash spells the backend by its old name, so an old config keeps its hash (its run
# id, its finished shards) and a renamed spelling of it is the same run.
BACKEND_ALIASES: dict[str, str] = {"template": "rules"}
_HASHED_AS: dict[str, str] = {new: old for old, new in BACKEND_ALIASES.items()}


class LLMConfig(_Strict):
    backend: Literal["rules", "openai", "transformers", "vllm", "template"] = Field(
        default="rules", description="rules: no model (sentences from the seed's words; `template` is "
        "its old name); openai: an OpenAI-compatible endpoint; transformers / vllm: in process.")
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    base_urls: list[str] = Field(default_factory=list, description="Data-parallel replicas (load is spread).")
    model: str | None = None
    revision: str | None = None
    api_key_env: str = Field(default="SPEECHPAIRS_LLM_API_KEY", description="Env var holding the API key.")
    system_prompt: str | None = None
    default_system_prompt: bool = Field(default=False, description="Send the shipped system prompt (transcript "
                                        "is data, not instructions) when system_prompt is unset.")
    temperature: float = Field(default=0.05, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=256, gt=0)
    seed: int = 0
    concurrency: int = Field(default=32, ge=1, le=4096)
    endpoint_limit: int | None = Field(default=None, ge=1, description="Prefect global concurrency limit per "
                                       "endpoint across all workers (requests in flight).")
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=1.0, ge=0)
    prompt_format: Literal["chat", "completion"] = Field(
        default="chat", description="completion: render the backbone's chat template locally and send text.")
    tokenizer: str | None = Field(default=None, description="Local tokenizer path for prompt_format=completion.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(default=None, ge=256)
    tensor_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    cache: bool = Field(default=True, description="Reuse finished generations from the run's staging area.")
    qc: QCConfig = Field(default_factory=QCConfig)

    @field_validator("base_url")
    @classmethod
    def _no_secret_in_url(cls, value: str | None) -> str | None:
        return refuse_userinfo(value, "put the key in the environment variable named by "
                               "llm.api_key_env (default SPEECHPAIRS_LLM_API_KEY)")

    @field_validator("base_urls")
    @classmethod
    def _no_secret_in_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            refuse_userinfo(url, "put the key in the environment variable named by "
                            "llm.api_key_env (default SPEECHPAIRS_LLM_API_KEY)")
        return value

    @model_validator(mode="after")
    def _endpoint(self) -> LLMConfig:
        if self.backend == "openai" and not ((self.base_url or self.base_urls) and self.model):
            raise ValueError("llm.backend 'openai' needs llm.base_url (or llm.base_urls) and llm.model")
        if self.backend in ("transformers", "vllm") and not self.model:
            raise ValueError(f"llm.backend {self.backend!r} needs llm.model (a model id or local path)")
        if self.prompt_format == "completion" and not (self.tokenizer or self.backend in ("transformers", "vllm")):
            raise ValueError("llm.prompt_format 'completion' needs llm.tokenizer (a local tokenizer path)")
        return self

    @property
    def backend_name(self) -> str:
        """`backend` by its current name (`template` → `rules`)."""
        return BACKEND_ALIASES.get(self.backend, self.backend)

    @property
    def endpoints(self) -> list[str]:
        """Every base URL to spread requests over."""
        return list(dict.fromkeys([*([self.base_url] if self.base_url else []), *self.base_urls]))


class OutputConfig(_Strict):
    root: str = Field(default="./data", description="Local directory or s3://bucket/prefix.")
    dataset: str = Field(default="speechpairs", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    shard_size: int = Field(default=1000, ge=1, le=100_000, description="Clips per shard (unit of work).")
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    audio_format: Literal["flac", "wav"] = "flac"
    # Commit policy: none of these change the rows, so they stay out of the config hash (raising a
    # ratio and re-running reuses every finished shard).
    allow_empty: bool = Field(default=False, description="Commit a version even when no clip became a row.")
    max_quarantine_ratio: float = Field(
        default=0.5, ge=0, le=1, description="Above this share of quarantined clips the run is a systemic "
        "fault: it stops before commit, naming the top reasons (staging is kept).")
    max_transient_ratio: float = Field(
        default=0.0, ge=0, le=1, description="Share of clips quarantined for a transient reason (LLM "
        "unavailable, storage error) a version may still be committed with; above it the run stops before "
        "commit and the next run of the same config retries those clips.")

    when_running: Literal["fail", "wait"] = Field(
        default="fail", description="A second launch of a run that is in progress (its lease is held and "
        "renewed): exit at once naming the holder, or wait for it to finish.")
    lease_s: float = Field(default=60.0, ge=5, le=3600, description="A run's lease expires this long after its "
                           "holder's last renewal (renewed every third of it): a dead launch's run is then taken over.")

    base: str | None = Field(
        default=None, pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*@)?[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Commit the run's new shards on top of a committed version on this root: `latest`, a tag or "
        "vNNNN of output.dataset, or DATASET@REF. The base's shards holding rows of the corpora this run "
        "produces are left out (mixed ones rewritten filtered), the rest referenced, not copied; a row id in "
        "both fails the commit. Unset: the version holds this run's rows only.")

    # The keys above that only decide whether and when to commit, and on top of what (left out of
    # RunConfig.config_hash: none changes the run's own rows).
    POLICY_KEYS: ClassVar[frozenset[str]] = frozenset({"allow_empty", "max_quarantine_ratio",
                                                        "max_transient_ratio", "when_running", "lease_s", "base"})


class ClusterConfig(_Strict):
    """How a run scales out; none of it changes the rows, so it is left out of the config hash."""

    address: str | None = Field(default=None, description="An existing Dask scheduler (tcp://host:8786) or Ray "
                                "cluster (ray://host:10001); unset: a local cluster on this machine.")
    workers: int = Field(default=2, ge=1, le=1024, description="Worker processes of the local Dask/Ray cluster.")
    threads_per_worker: int = Field(default=1, ge=1, le=64, description="Shard tasks per local Dask worker.")
    result_storage: str | None = Field(default=None, description="Saved Prefect filesystem block (e.g. "
                                       "'s3-bucket/speechpairs-results') where task results are persisted, "
                                       "so workers on other machines share them.")
    gpu_limit: str = Field(default="speechpairs-gpu", description="Prefect global concurrency limit each GPU "
                           "stage (Whisper, classifiers, local LLM) holds a slot of while it runs.")
    gpu_slots: int | None = Field(default=None, ge=1, description="Set the GPU limit to this many slots "
                                  "(default: the GPUs the flow's machine sees, for a new limit).")
    stage_tags: bool = Field(default=False, description="Tag task runs by stage (plan/shard/commit) in the UI; "
                             "each tagged task run costs Prefect tag-concurrency round trips.")
    gpu_gate: Literal["auto", "always", "never"] = Field(
        default="auto", description="auto: gate the model stages that run on a GPU; always: gate them on CPU "
        "too (a shared machine); never: no gate.")


class S3Config(_Strict):
    """Endpoint settings. Credentials never live in the config: they come from a named Prefect
    `AwsCredentials` block, or else from boto3's usual chain (AWS_* environment variables first)."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    credentials_block: str | None = Field(default=None, description="Name of a Prefect AwsCredentials block.")
    max_attempts: int = Field(default=8, ge=1, le=50, description="Attempts per S3 call (throttling, 5xx, outages).")

    @field_validator("endpoint_url")
    @classmethod
    def _no_secret_in_url(cls, value: str | None) -> str | None:
        return refuse_userinfo(value, "give the keys as AWS_ACCESS_KEY_ID / "
                               "AWS_SECRET_ACCESS_KEY or a Prefect AwsCredentials block (s3.credentials_block)")


class RunConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    output: OutputConfig = Field(default_factory=OutputConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    describe: DescribeConfig = Field(default_factory=DescribeConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    s3: S3Config = Field(default_factory=S3Config)
    runner: Literal["thread", "sequential", "process", "dask", "ray"] = Field(
        default="thread", description="Where shard tasks run: threads or processes of the flow's process, "
        "a Dask cluster (prefect-dask) or a Ray cluster (prefect-ray).")
    max_workers: int = Field(default=2, ge=1, le=256, description="Shard tasks in parallel (thread/process).")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    segment: SegmentConfig | None = Field(
        default=None, description="How recordings longer than audio.max_duration_s (or every recording of a "
        "source with mode: always) become clips; sources[].segment overrides it per source. Unset: mode auto "
        "with the defaults below (max_s at most audio.max_duration_s); `mode: never` keeps a long clip `too_long`.")

    @model_validator(mode="after")
    def _segments_fit(self) -> RunConfig:
        """Every source's segments must fit under audio.max_duration_s, or each would be `too_long`."""
        for index, source in enumerate(self.sources):
            try:
                segment = self.segment_for(source)
            except ValidationError as exc:
                problem = "; ".join(e["msg"] for e in exc.errors())
                raise ValueError(f"sources[{index}].segment over the run's segment block: {problem}") from None
            if segment.mode != "never" and segment.max_s > self.audio.max_duration_s:
                where = "segment.max_s" if source.segment is None or source.segment.max_s is None \
                    else f"sources[{index}].segment.max_s"
                raise ValueError(f"{where} ({segment.max_s}) must not exceed audio.max_duration_s "
                                 f"({self.audio.max_duration_s}): every segment would be too_long; lower "
                                 f"{where} or raise audio.max_duration_s")
        return self

    def segment_for(self, source: SourceConfig) -> SegmentConfig:
        """The segment settings of one source: the run's block with the source's overrides; with
        neither set, mode auto (`implicit_segment`)."""
        base = self.segment or self.implicit_segment()
        return base if source.segment is None else source.segment.over(base)

    def implicit_segment(self) -> SegmentConfig:
        """No `segment` block: mode auto, segments capped at audio.max_duration_s where that is under
        the default max_s (so a config that lowers the clip cap stays valid); a cap too short for
        any segment (<= min_s) leaves mode never. The config hash leaves the unset block out."""
        default = SegmentConfig()
        if default.max_s <= self.audio.max_duration_s:
            return default
        try:
            return SegmentConfig(max_s=self.audio.max_duration_s)
        except ValidationError:
            return SegmentConfig(mode="never")

    @model_validator(mode="after")
    def _bind_sources_s3(self) -> RunConfig:
        """Each source carries the run's `s3` block, so ingest reads s3:// sources with it."""
        for source in self.sources:
            source.bind_run_s3(self.s3)
        return self

    def config_hash(self) -> str:
        """Hash of everything that changes the output rows; shards are reused only on equal hashes."""
        exclude: dict[str, Any] = {"runner": True, "max_workers": True, "cluster": True,
                                   "output": set(OutputConfig.POLICY_KEYS)}
        payload = self.model_dump(mode="json", exclude=exclude)
        for source in payload["sources"]:
            for key in ("s3", "segment"):  # no override: the hash of configs written before it existed
                if source.get(key) is None:
                    source.pop(key, None)
        if payload.get("segment") is None:  # unset: the hash of configs from before it existed
            payload.pop("segment", None)
        payload["llm"]["backend"] = _HASHED_AS.get(self.llm.backend, self.llm.backend)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


def _coerce(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 500 → int, true → bool, [a, b] → list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = [] if parts[i + 1].isdigit() else {}
            node[part] = nxt
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside `X`, `list[X]` or `X | None`; None when there is none."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _keys_beside(loc: Sequence[str | int]) -> list[str]:
    """The keys allowed where the key at `loc` is (its parent model's fields); [] when not a model."""
    def accepted(model: Any) -> dict[str, Any]:  # every name a field is accepted under → the field
        names: dict[str, Any] = {}
        for name, field in model.model_fields.items():
            choices = getattr(field.validation_alias, "choices", [field.validation_alias or field.alias or name])
            names.update({c: field for c in choices if isinstance(c, str)})
        return names

    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list item: `_model_in` already stepped into the item type
        fields = accepted(model)
        model = _model_in(fields[part].annotation) if part in fields else None
        if model is None:
            return []
    return list(accepted(model))


def _env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.upper().replace(".", "__")


def _format_errors(err: ValidationError, env_origins: Mapping[str, str] | None = None) -> str:
    """One line per error: the dotted key, the environment variables that set it (named, never their
    values: they may hold secrets), what is wrong and, for an unknown key, the closest allowed names."""
    origins = env_origins or {}
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        involved = [var for dotted, var in origins.items()
                    if e["loc"] and (dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."))]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            bad = str(e["loc"][-1])
            close = difflib.get_close_matches(bad, _keys_beside(e["loc"]), n=3, cutoff=0.6)
            if close:
                spelled = [f"{c!r}" for c in close]
                for dotted, var in origins.items():  # an env variable with the typo: name the right variable
                    if var in involved and (dotted == key or dotted.startswith(key + ".")):
                        spelled[0] += f" ({_env_name(key[: -len(bad)] + close[0] + dotted[len(key):])})"
                        break
                msg = f"unknown key; did you mean {' or '.join(spelled)}? (see README 'Config reference')"
            else:
                beside = _keys_beside(e["loc"])
                msg = ("unknown key (check the spelling; see README 'Config reference'"
                       + (f"; keys here: {', '.join(beside)})" if beside else ")"))
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        where = f" (environment: {', '.join(f'{v}=…' for v in involved)})" if involved else ""
        lines.append(f"  {key}{where}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def _env_items(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, 'dotted=value') for every SPEECHPAIRS__… variable, sorted by name."""
    out = []
    for key, value in sorted(environ.items()):
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
            out.append((key, f"{dotted}={value}"))
    return out


def env_overrides(environ: Mapping[str, str]) -> list[str]:
    """SPEECHPAIRS__OUTPUT__ROOT=s3://b/p → 'output.root=s3://b/p' (double underscore = dot)."""
    return [item for _, item in _env_items(environ)]


def parse_config(data: Mapping[str, Any], overrides: Sequence[str] = (),
                 environ: Mapping[str, str] | None = None) -> RunConfig:
    """Dict + environment + `--set` overrides (in that order of precedence) → validated RunConfig.
    An error in a value that came from the environment names the variable that set it."""
    merged: dict[str, Any] = json.loads(json.dumps(dict(data)))  # deep copy, plain types
    env = os.environ if environ is None else environ
    env_origins: dict[str, str] = {}  # dotted key → the variable that set it (unless --set replaced it)
    for var, item in [*_env_items(env), *((None, item) for item in overrides)]:
        if "=" not in item:
            raise ConfigError(f"--set needs key=value, got {item!r}")
        key, _, raw = item.partition("=")
        key = key.strip()
        origin = f"{var}=…" if var else f"--set {key}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise ConfigError(f"{var}: {key!r} is not a setting name: use SPEECHPAIRS__<SECTION>__<KEY>, e.g. "
                              "SPEECHPAIRS__OUTPUT__ROOT" if var else
                              f"--set key {key!r} is not a dotted name like output.root")
        try:
            _set_dotted(merged, key, _coerce(raw))
        except (ValueError, IndexError, AttributeError, TypeError) as exc:
            raise ConfigError(f"{origin}: cannot apply ({exc})") from exc
        for dotted in [d for d in env_origins if d == key or d.startswith(key + ".")]:
            del env_origins[dotted]
        if var:
            env_origins[key] = var
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, env_origins)) from None


def load_config(path: str | Path, overrides: Sequence[str] = (),
                environ: Mapping[str, str] | None = None) -> RunConfig:
    """Read YAML at `path`; relative source paths and output root resolve against its folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of settings")
    base = p.resolve().parent
    for src in data.get("sources") or []:
        if isinstance(src, dict) and isinstance(src.get("path"), str) and "://" not in src["path"]:
            src["path"] = str((base / src["path"]).resolve()) if not Path(src["path"]).is_absolute() else src["path"]
        if isinstance(src, dict) and isinstance(src.get("allowed_roots"), list):
            src["allowed_roots"] = [str((base / r).resolve()) if isinstance(r, str) and "://" not in r
                                    and "\0" not in r and not Path(r).is_absolute() else r
                                    for r in src["allowed_roots"]]
    return parse_config(data, overrides, environ)
