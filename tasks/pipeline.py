"""The per-shard work: clips → (decode, features, describe, LLM) → staged Parquet + quarantine.

One call processes one shard in plain Python; the flow wraps it in a single Prefect task run.
Clips move through in micro-batches so memory stays bounded by the batch, not the shard, and the
LLM backend still sees many requests at once. Every clip ends as a row or a quarantine row; an
unexpected error in one clip quarantines that clip with the stage, never the whole shard.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, Field

from schemas.arrow import QUARANTINE_SCHEMA, ROW_SCHEMA, quarantine_to_table, rows_to_table
from schemas.config import QCConfig, RunConfig
from schemas.manifest import ShardInfo
from schemas.records import (
    AudioRef,
    Clip,
    Features,
    Provenance,
    QuarantineError,
    QuarantineRow,
    ReasonCode,
    Row,
    Segment,
    Stage,
    utc_now,
)
from storage.objectstore import ObjectStore
from storage.shards import ParquetShardWriter, read_marker, write_marker, write_parquet_shard
from tasks.audio import DecodedAudio, encode_audio, load_audio, require_speech
from tasks.commit_gate import EXAMPLE_CHARS, QuarantineExample, shard_needs_redo
from tasks.describe import (
    Bins,
    describe_attributes,
    describe_multi_span,
    instruction_pool,
    load_bins,
    pick_instruction,
    prompt_transcript,
    seed_description,
    stable_int,
    without_voice,
)
from tasks.features import extract_features
from tasks.features.labels import resolve_attributes
from tasks.features.models import LoadedModels, load_models
from tasks.features.phonemes import phoneme_counts, phoneme_rate
from tasks.features.rate import speaking_rates
from tasks.gpu import StageGate, no_gate
from tasks.ingest import load_clip
from tasks.llm import LLMBackend, LLMRequest, LLMResult, build_messages, make_backend
from tasks.llm.base import OnResult, generate_reporting
from tasks.llm.cache import CachedBackend
from tasks.llm.messages import DEFAULT_SYSTEM_PROMPT, transcript_too_long
from tasks.llm.qc import Instruction, QCVerdict, check_response, parse_instruction
from tasks.plan import ShardPlan
from tasks.stopping import check_stop

# Not Prefect's logger (this module stays plain Python): the flow forwards "speechpairs" records to
# the Prefect API, so each quarantined clip shows in the run's logs with its shard and clip id.
log = logging.getLogger("speechpairs.pipeline")

# Set by the CLI to drive a progress bar: called with ("total", clips, 0) once planned, then per
# finished batch with ("done", clips, rows) - the batch's other clips were quarantined - or, for a
# shard an earlier attempt finished, ("reused", clips, rows), which a rate must not count.
ProgressHook = Callable[[str, int, int], None]
_progress_hook: ProgressHook | None = None


def set_progress_hook(hook: ProgressHook | None) -> None:
    global _progress_hook
    _progress_hook = hook


def report_total(clips: int) -> None:
    if _progress_hook is not None:
        _progress_hook("total", clips, 0)


def report_done(n: int, rows: int, *, reused: bool = False) -> None:
    if _progress_hook is not None and n:
        _progress_hook("reused" if reused else "done", n, rows)


class RunContext(BaseModel):
    """What every row of a run shares (provenance), computed once by the flow."""

    run_id: str
    staging: str
    config_hash: str
    pipeline_version: str
    bins_version: str
    extractor_versions: dict[str, str]
    # An earlier attempt of this run was refused at commit: shards with clips quarantined at a model
    # stage are redone too (commit_gate.shard_needs_redo), not only those with transient failures.
    after_refusal: bool = False


class ShardOutcome(BaseModel):
    index: int
    clips: int
    rows: int
    quarantined: int
    by_reason: dict[str, int] = Field(default_factory=dict)
    by_stage: dict[str, int] = Field(default_factory=dict)
    audio_seconds: float = 0.0
    attribute_counts: dict[str, dict[str, int]] = Field(default_factory=dict)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    qc_failures: dict[str, int] = Field(default_factory=dict)
    tokens_prompt: int = 0  # summed over the shard's rows (0 where the backend reports none)
    tokens_completion: int = 0
    rows_without_transcript: int = 0  # labels-only seeds
    examples: dict[str, QuarantineExample] = Field(default_factory=dict)  # the first clip per reason
    shard: ShardInfo | None = None
    quarantine: ShardInfo | None = None
    config_hash: str
    skipped: bool = False


@dataclass
class _Prepared:
    measured: _Measured
    features: Features
    attributes: dict[str, str]
    attribute_sources: dict[str, str]
    seed: str
    instruction: Instruction
    request: LLMRequest


@dataclass
class _Acc:
    quarantine: list[QuarantineRow] = field(default_factory=list)
    attribute_counts: dict[str, Counter[str]] = field(default_factory=dict)
    audio_seconds: float = 0.0
    n_rows: int = 0
    stage_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    qc_failures: Counter[str] = field(default_factory=Counter)
    tokens_prompt: int = 0
    tokens_completion: int = 0
    rows_without_transcript: int = 0
    examples: dict[str, QuarantineExample] = field(default_factory=dict)
    unlogged: Counter[str] = field(default_factory=Counter)  # quarantined beyond the log budget
    run_id: str = ""
    shard: int = -1  # the shard's index, for log lines
    # The run's planned-at time, stamped on every row: redoing a shard gives byte-identical output.
    created_at: datetime = field(default_factory=utc_now)
    # Held around each model stage's compute: the flow passes a GPU concurrency limit (tasks/gpu.py).
    gate: StageGate = no_gate


def run_backend(config: RunConfig, store: ObjectStore, ctx: RunContext) -> LLMBackend:
    """The run's LLM backend; with `llm.cache` finished requests live in the run's staging area, so
    a retried shard or a resumed run never asks the model twice for the same request."""
    backend = make_backend(config.llm)
    return CachedBackend(backend, store, ctx.staging, config=config.llm) if config.llm.cache else backend


def marker_key(ctx: RunContext, index: int) -> str:
    return f"{ctx.staging}/markers/shard-{index:05d}.json"


def finished_outcome(store: ObjectStore, ctx: RunContext, index: int, *, redo: bool = True) -> ShardOutcome | None:
    """The outcome recorded by an earlier attempt of this shard with the same config, if any.

    With `redo`, a shard whose clips a re-run should retry (transient failures; model-stage failures
    after a refused commit) counts as unfinished, so it is processed again."""
    payload = read_marker(store, marker_key(ctx, index))
    if payload is None:
        return None
    outcome = ShardOutcome.model_validate(payload)
    if outcome.config_hash != ctx.config_hash:
        return None
    if redo and shard_needs_redo(outcome.by_reason, outcome.by_stage, ctx.after_refusal):
        log.info("shard %05d: redoing it, an earlier attempt quarantined clips a re-run retries (%s)",
                 index, ", ".join(f"{k}={v}" for k, v in sorted(outcome.by_reason.items())))
        return None
    return outcome


def process_shard(plan: ShardPlan, config: RunConfig, store: ObjectStore, ctx: RunContext,
                  backend: LLMBackend, batch_size: int | None = None, gate: StageGate = no_gate) -> ShardOutcome:
    """Process one planned shard end to end, idempotently: a finished shard is returned as is.

    `gate(stage)` is entered around every model stage (asr, classify, llm) so that shards running
    in parallel never share a GPU at once.
    """
    # Enough requests per LLM call to keep every concurrency slot busy while stragglers finish.
    batch_size = batch_size or max(64, 2 * config.llm.concurrency)
    done = finished_outcome(store, ctx, plan.index)
    if done is not None:
        report_done(done.clips, done.rows, reused=True)
        return done.model_copy(update={"skipped": True})
    bins = load_bins(config.describe.bins)
    models = load_models(config.features)
    if isinstance(backend, CachedBackend):  # a resumed shard reads its own cached results, not the run's
        backend = backend.scoped(f"shard-{plan.index:05d}")
    acc = _Acc(shard=plan.index, run_id=ctx.run_id, created_at=plan.created_at or utc_now(), gate=gate)
    key = f"{ctx.staging}/shards/train-{plan.index:05d}.parquet"
    with ParquetShardWriter(store, key, ROW_SCHEMA, compression=config.output.compression) as writer:
        for batch in _batches((load_clip(ref, config.sources) for ref in plan.refs), batch_size):
            check_stop(f"shard {plan.index:05d}")
            prepared = _prepare_batch(batch, config, bins, acc, models)
            t0 = time.perf_counter()
            results: list[LLMResult | QuarantineError] = []
            if prepared:
                with gate("llm"):
                    results = generate_with_qc(prepared, backend, config, acc.qc_failures)
            acc.stage_seconds["llm"] += time.perf_counter() - t0
            rows = [row for p, r in zip(prepared, results, strict=True)
                    if (row := _finish(p, r, config, ctx, acc, backend)) is not None]
            t0 = time.perf_counter()
            writer.write(rows_to_table(rows))  # streamed: the shard is never held in memory
            acc.n_rows += len(rows)
            acc.stage_seconds["write"] += time.perf_counter() - t0
            report_done(len(batch), len(rows))
        t0 = time.perf_counter()
        shard = writer.close()
        acc.stage_seconds["write"] += time.perf_counter() - t0
    return _write_outcome(plan, store, ctx, config, acc, shard)


def qc_rules(config: RunConfig) -> QCConfig:
    """The QC config in force: the template backend ignores instructions, so `format` is moot there."""
    qc = config.llm.qc
    if config.llm.backend == "template" and "format" in qc.rules:
        return qc.model_copy(update={"rules": [r for r in qc.rules if r != "format"]})
    return qc


def generate_with_qc(prepared: list[_Prepared], backend: LLMBackend, config: RunConfig,
                     failures: Counter[str]) -> list[LLMResult | QuarantineError]:
    """Generate, check every response, regenerate the failed ones with a new seed, then quarantine.

    `failures` counts every QC failure by rule, regenerated ones included.
    """
    qc = qc_rules(config)
    final: list[LLMResult | QuarantineError | None] = [None] * len(prepared)
    verdicts: dict[int, QCVerdict] = {}
    pending = list(range(len(prepared)))
    for attempt in range(qc.max_regenerations + 1 if qc.enabled else 1):
        requests = [prepared[i].request if attempt == 0 else prepared[i].request.model_copy(
            update={"seed": stable_int(prepared[i].request.seed, "regenerate", attempt) % (2**31)})
            for i in pending]
        early: dict[int, tuple[str, QCVerdict]] = {}
        results = generate_reporting(backend, requests, _checker([prepared[i] for i in pending], qc, early)) \
            if qc.enabled else backend.generate(requests)
        still: list[int] = []
        for j, (i, result) in enumerate(zip(pending, results, strict=True)):
            if isinstance(result, QuarantineError) or not qc.enabled:
                final[i] = result
                continue
            seen = early.get(j)
            verdict = seen[1] if seen is not None and seen[0] == result.text else _check(prepared[i], result, qc)
            if verdict.ok and not attempt:
                final[i] = result
            elif verdict.ok:  # the regenerations before this one count as attempts
                gen = result.generation.model_copy(update={"attempts": result.generation.attempts + attempt})
                final[i] = result.model_copy(update={"generation": gen})
            else:
                failures[verdict.reason or "unknown"] += 1
                verdicts[i] = verdict
                still.append(i)
        pending = still
        if not pending:
            break
    for i in pending:
        v = verdicts[i]
        final[i] = QuarantineError(Stage.llm, ReasonCode(f"qc_{v.reason}"),
                                   f"{prepared[i].measured.clip.id}: response failed QC ({v.reason}: {v.detail}) "
                                   f"after {qc.max_regenerations + 1} generations")
    return [r for r in final if r is not None]


def _check(p: _Prepared, result: LLMResult, qc: QCConfig) -> QCVerdict:
    # The transcript as the seed shows it (sanitised), not the raw one: what the model could quote.
    return check_response(result.text, seed_description=p.seed, attributes=p.attributes,
                          transcript=p.request.transcript, instruction=p.instruction,
                          finish_reason=result.generation.finish_reason, config=qc)


def _checker(batch: list[_Prepared], qc: QCConfig, early: dict[int, tuple[str, QCVerdict]]) -> OnResult:
    """An on_result callback that checks each response as it arrives, into `early[index]`, while the
    rest of the batch is still generating: checking a whole batch after it returns left the model
    server idle meanwhile (~6% of throughput at 64 in flight, bench/llm.py). A check that raises is
    left for the caller to repeat after the batch, so the batch itself never fails here."""
    def check(j: int, result: LLMResult | QuarantineError) -> None:
        if isinstance(result, LLMResult):
            with contextlib.suppress(Exception):
                early[j] = (result.text, _check(batch[j], result, qc))
    return check


def _batches(items: Iterable[Clip], size: int) -> Iterator[list[Clip]]:
    batch: list[Clip] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _quarantine(acc: _Acc, clip: Clip, stage: Stage, reason: ReasonCode, message: str) -> None:
    acc.quarantine.append(QuarantineRow(id=clip.id, dataset=clip.dataset, audio_uri=clip.audio_uri,
                                        stage=stage, reason_code=reason, message=message,
                                        created_at=acc.created_at))
    if reason.value not in acc.examples:
        acc.examples[reason.value] = QuarantineExample(id=clip.id, message=message[:EXAMPLE_CHARS])
    # A line per quarantined clip for the first few of each reason, so ops find them from the run's
    # logs; then only counted (a line per shard): 200k log records would take minutes to flush and
    # bloat the Prefect database, and the quarantine Parquet lists every clip anyway.
    if not _log_budget.take(acc.run_id, reason.value):
        acc.unlogged[reason.value] += 1
        return
    where = f"shard {acc.shard:05d}" if acc.shard >= 0 else "measuring"
    log.warning("%s clip %s: quarantined at %s (%s): %s", where, clip.id, stage.value,
                reason.value, message if len(message) <= 500 else message[:500] + "…")


QUARANTINE_LOG_PER_REASON = 20


class _LogBudget:
    """How many quarantine lines each (run, reason) may still log in this process."""

    def __init__(self, per_reason: int) -> None:
        self.per_reason = per_reason
        self._used: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def take(self, run_id: str, reason: str) -> bool:
        with self._lock:
            if self._used[run_id, reason] >= self.per_reason:
                return False
            self._used[run_id, reason] += 1
            return True


_log_budget = _LogBudget(QUARANTINE_LOG_PER_REASON)


@dataclass
class _Measured:
    """A clip after decode + DSP, on its way through the batched model stages."""

    clip: Clip
    audio: DecodedAudio
    features: Features
    transcript: str | None
    transcript_source: str | None
    language: str | None
    segments: list[Segment] = field(default_factory=list)
    predictions: dict[str, tuple[str, float]] = field(default_factory=dict)
    speech: bool = True  # False: a clip of a `sources[].speech: false` source (sound, music)


def _prepare_batch(batch: list[Clip], config: RunConfig, bins: Bins, acc: _Acc,
                   models: LoadedModels) -> list[_Prepared]:
    """Decode + DSP per clip, then Whisper and classifiers per batch, then describe per clip."""
    measured = [m for m in (_measure(clip, config, acc) for clip in batch) if m is not None]
    measured = _transcribe(measured, models, config, acc)
    _add_rates(measured, config, acc)
    measured = _classify(measured, models, acc)
    return [p for p in (_describe(m, config, bins, acc) for m in measured) if p is not None]


def measure_clips(clips: list[Clip], config: RunConfig, bins: Bins, models: LoadedModels,
                  ) -> tuple[list[Features], list[QuarantineRow]]:
    """Each clip's features exactly as a run resolves them (DSP, Whisper rates, classifiers, labels),
    and the quarantine rows of the clips a run would drop; for calibration, outside any shard."""
    acc = _Acc()
    return [p.features for p in _prepare_batch(clips, config, bins, acc, models)], acc.quarantine


def _measure(clip: Clip, config: RunConfig, acc: _Acc) -> _Measured | None:
    check_stop(f"shard {acc.shard:05d}")  # outside the per-clip `except`: a stop is not a bad clip
    if clip.ingest_error is not None:
        reason, message = clip.ingest_error
        _quarantine(acc, clip, Stage.ingest, reason, message)
        return None
    cap = config.describe.max_transcript_chars
    if transcript_too_long(clip.transcript, cap):  # its raw length, before any work is spent on it
        _quarantine(acc, clip, Stage.ingest, ReasonCode.transcript_too_long,
                    f"{clip.audio_uri}: transcript of {len(clip.transcript or '')} characters > "
                    f"describe.max_transcript_chars={cap}; fix the corpus row (a whole text pasted into one "
                    "transcript?) or raise the limit")
        return None
    speech = clip.speech
    stage = Stage.audio
    try:
        t0 = time.perf_counter()
        audio = load_audio(clip, config.audio)
        t1 = time.perf_counter()
        stage = Stage.features
        features = extract_features(audio.samples, audio.sampling_rate, clip.transcript, clip.labels, config.features)
        features = features.model_copy(update={"clipping_ratio": audio.clipping_ratio})
        if speech:  # a sound or music source keeps its clips whatever the VAD says
            require_speech(features.speech_duration_s, clip.audio_uri, config.audio)
    except QuarantineError as exc:
        _quarantine(acc, clip, exc.stage, exc.reason, exc.message)
        return None
    except Exception as exc:  # noqa: BLE001 - one clip's bug must not take the shard down
        reason = ReasonCode.feature_error if stage is Stage.features else ReasonCode.unreadable
        _quarantine(acc, clip, stage, reason, f"{clip.audio_uri}: {exc.__class__.__name__}: {exc}")
        return None
    acc.stage_seconds["audio"] += t1 - t0
    acc.stage_seconds["features"] += time.perf_counter() - t1
    return _Measured(clip=clip, audio=audio, features=features, transcript=clip.transcript,
                     transcript_source="corpus" if clip.transcript else None, language=clip.language, speech=speech)




def _transcribe(measured: list[_Measured], models: LoadedModels, config: RunConfig, acc: _Acc) -> list[_Measured]:
    """Whisper for the clips without a corpus transcript; a failed or hallucinated one is quarantined."""
    todo = [m for m in measured if not m.transcript and m.speech]  # Whisper on sound only hallucinates
    if models.transcriber is None or not todo:
        return measured
    t0 = time.perf_counter()
    with acc.gate("asr"), models.lock("asr"):
        results = models.transcriber.transcribe([m.audio.samples for m in todo])
    acc.stage_seconds["asr"] += time.perf_counter() - t0
    dropped: set[int] = set()
    for m, result in zip(todo, results, strict=True):
        if isinstance(result, QuarantineError):
            _quarantine(acc, m.clip, result.stage, result.reason, f"{m.clip.audio_uri}: {result.message}")
            dropped.add(id(m))
            continue
        m.features = m.features.model_copy(update={
            "asr_no_speech_prob": result.no_speech_prob, "asr_avg_logprob": result.avg_logprob,
            "asr_compression_ratio": result.compression_ratio})
        if result.text:
            m.transcript = result.text
            m.transcript_source = models.transcriber.model_name
            m.segments = list(result.segments)
        m.language = m.language or result.language
    return [m for m in measured if id(m) not in dropped]


def _add_rates(measured: list[_Measured], config: RunConfig, acc: _Acc) -> None:
    """Words/syllables per second for Whisper transcripts, phonemes per second for every transcript."""
    t0 = time.perf_counter()
    for m in measured:
        if m.transcript_source not in (None, "corpus"):
            wps, sps = speaking_rates(m.transcript, m.features.speech_duration_s)
            m.features = m.features.model_copy(update={"speaking_rate_wps": wps, "speaking_rate_sps": sps})
    if config.features.phoneme_rate:
        by_language: dict[str | None, list[_Measured]] = {}
        for m in measured:
            if m.transcript:
                by_language.setdefault(m.language, []).append(m)
        for language, group in by_language.items():
            counts = phoneme_counts([m.transcript for m in group], language or "en")
            for m, count in zip(group, counts, strict=True):
                pps = phoneme_rate(count, m.features.speech_duration_s)
                m.features = m.features.model_copy(update={"speaking_rate_pps": pps})
    acc.stage_seconds["phonemes"] += time.perf_counter() - t0


def _classify(measured: list[_Measured], models: LoadedModels, acc: _Acc) -> list[_Measured]:
    """Each configured classifier over the batch; a clip one of them fails on is quarantined."""
    for classifier in models.classifiers:
        if not measured:
            break
        t0 = time.perf_counter()
        with acc.gate("classify"), models.lock(f"classifier.{classifier.attribute}"):
            results = classifier.classify([m.audio.samples for m in measured])
        acc.stage_seconds["classify"] += time.perf_counter() - t0
        kept: list[_Measured] = []
        for m, result in zip(measured, results, strict=True):
            if isinstance(result, QuarantineError):
                _quarantine(acc, m.clip, result.stage, result.reason, f"{m.clip.audio_uri}: {result.message}")
            else:
                m.predictions[classifier.attribute] = result
                kept.append(m)
        measured = kept
    return measured


def _describe(m: _Measured, config: RunConfig, bins: Bins, acc: _Acc) -> _Prepared | None:
    t0 = time.perf_counter()
    clip = m.clip
    cap = config.describe.max_transcript_chars
    if transcript_too_long(m.transcript, cap):  # a Whisper transcript (corpus ones were checked on entry)
        _quarantine(acc, clip, Stage.describe, ReasonCode.transcript_too_long,
                    f"{clip.audio_uri}: {m.transcript_source} transcript of {len(m.transcript or '')} characters > "
                    f"describe.max_transcript_chars={cap}")
        return None
    # A non-speech source: a labels-only seed (no transcript, no voice attributes), as DeSTA2.5 for sound.
    transcript = m.transcript if m.speech else None
    try:
        min_scores = {c.attribute: c.min_score for c in config.features.classifiers}
        features = resolve_attributes(m.features, clip.labels, m.predictions, min_scores)
        if not m.speech:
            features = without_voice(features)
        segments: list[Segment] | None = m.segments if config.describe.segment_timestamps and m.speech else None
        if len(clip.spans) > 1 and m.speech:  # several supervisions (lhotse): one span each, with its own attributes
            multi = describe_multi_span(features, clip.labels, clip.spans, m.audio.samples, m.audio.sampling_rate,
                                        bins, config.describe.attributes, clip.seed_labels, config.features)
            described, shown, segments = multi.merged, multi.clip.words, multi.spans
            m.segments = multi.spans
        else:
            described = describe_attributes(features, clip.labels, bins, config.describe.attributes,
                                            clip.seed_labels)
            shown = described.words
        attributes = described.words
        # Transcript, names and values are data: seed_description sanitises every one of them.
        seed = seed_description(transcript, m.audio.duration_s, shown, config.describe.format, segments)
        shown_transcript = prompt_transcript(transcript, shown, segments)
        instruction = parse_instruction(
            pick_instruction(instruction_pool(config.describe), config.describe.seed, clip.id))
        system = config.llm.system_prompt or (DEFAULT_SYSTEM_PROMPT if config.llm.default_system_prompt else None)
        messages = build_messages(seed, instruction.text, system)
    except Exception as exc:  # noqa: BLE001 - one clip's bug must not take the shard down
        _quarantine(acc, clip, Stage.describe, ReasonCode.describe_error,
                    f"{clip.audio_uri}: {exc.__class__.__name__}: {exc}")
        return None
    acc.stage_seconds["describe"] += time.perf_counter() - t0
    request = LLMRequest(id=clip.id, messages=messages, seed=stable_int(config.llm.seed, clip.id) % (2**31),
                         attributes=attributes, transcript=shown_transcript, duration_s=m.audio.duration_s)
    return _Prepared(measured=m, features=features, attributes=attributes, attribute_sources=described.sources,
                     seed=seed, instruction=instruction, request=request)


def rendered_prompt(backend: LLMBackend, config: RunConfig, request: LLMRequest) -> str | None:
    """The prompt text exactly as the model got it, where we render the chat template ourselves."""
    inner = getattr(backend, "inner", backend)  # through the request cache
    render = getattr(inner, "render", None)
    if config.llm.backend in ("transformers", "vllm") and callable(render):
        return str(render(request))
    if config.llm.prompt_format == "completion" and config.llm.tokenizer:
        from tasks.llm.chat_template import render_prompt

        return render_prompt(request.messages, config.llm.tokenizer)
    return None


def _finish(p: _Prepared, result: LLMResult | QuarantineError, config: RunConfig, ctx: RunContext,
            acc: _Acc, backend: LLMBackend) -> Row | None:
    if isinstance(result, QuarantineError):
        _quarantine(acc, p.measured.clip, result.stage, result.reason, result.message)
        return None
    t0 = time.perf_counter()
    fmt = config.output.audio_format
    m = p.measured
    local = m.clip.id.split("/", 1)[-1]
    row = Row(
        id=m.clip.id,
        dataset=m.clip.dataset,
        audio=AudioRef(bytes=encode_audio(m.audio.samples, m.audio.sampling_rate, fmt), path=f"{local}.{fmt}"),
        audio_uri=m.clip.audio_uri,
        audio_sha256=m.audio.sha256,
        sampling_rate=m.audio.sampling_rate,
        duration_s=m.audio.duration_s,
        transcript=m.transcript,
        transcript_source=m.transcript_source,
        language=m.language,
        segments=m.segments,
        labels=m.clip.labels,
        features=p.features,
        attributes=p.attributes,
        attribute_sources=p.attribute_sources,
        seed_description=p.seed,
        prompt=p.instruction.text,
        messages=p.request.messages,
        rendered_prompt=rendered_prompt(backend, config, p.request),
        response=result.text,
        generation=result.generation,
        provenance=Provenance(pipeline_version=ctx.pipeline_version, config_hash=ctx.config_hash,
                              bins_version=ctx.bins_version, extractor_versions=ctx.extractor_versions,
                              run_id=ctx.run_id, created_at=acc.created_at),
    )
    acc.audio_seconds += m.audio.duration_s
    acc.rows_without_transcript += not m.transcript
    acc.tokens_prompt += result.generation.prompt_tokens or 0
    acc.tokens_completion += result.generation.completion_tokens or 0
    for key, word in p.attributes.items():
        acc.attribute_counts.setdefault(key, Counter())[word] += 1
    acc.stage_seconds["encode"] += time.perf_counter() - t0
    return row


def _write_outcome(plan: ShardPlan, store: ObjectStore, ctx: RunContext, config: RunConfig,
                   acc: _Acc, shard: ShardInfo | None) -> ShardOutcome:
    if acc.unlogged:
        log.warning("shard %05d: %d more quarantined clips not logged one by one (%s); the quarantine Parquet "
                    "lists every clip", plan.index, sum(acc.unlogged.values()),
                    ", ".join(f"{k}={v}" for k, v in sorted(acc.unlogged.items())))
    t0 = time.perf_counter()
    compression = config.output.compression
    quarantine = None
    if acc.quarantine:
        qtable = quarantine_to_table(acc.quarantine).cast(QUARANTINE_SCHEMA)
        quarantine = write_parquet_shard(store, f"{ctx.staging}/quarantine/part-{plan.index:05d}.parquet",
                                         qtable, compression=compression)
    acc.stage_seconds["write"] += time.perf_counter() - t0
    outcome = ShardOutcome(
        index=plan.index,
        clips=len(plan.refs),
        rows=acc.n_rows,
        quarantined=len(acc.quarantine),
        by_reason=dict(Counter(q.reason_code.value for q in acc.quarantine)),
        by_stage=dict(Counter(q.stage.value for q in acc.quarantine)),
        audio_seconds=acc.audio_seconds,
        attribute_counts={k: dict(v) for k, v in acc.attribute_counts.items()},
        stage_seconds={k: round(v, 4) for k, v in acc.stage_seconds.items()},
        qc_failures=dict(acc.qc_failures),
        tokens_prompt=acc.tokens_prompt,
        tokens_completion=acc.tokens_completion,
        rows_without_transcript=acc.rows_without_transcript,
        examples=acc.examples,
        shard=shard,
        quarantine=quarantine,
        config_hash=ctx.config_hash,
    )
    if outcome.rows + outcome.quarantined != outcome.clips:
        raise RuntimeError(f"shard {plan.index}: {outcome.clips} clips in but {outcome.rows} rows + "
                           f"{outcome.quarantined} quarantined out; refusing to mark it complete")
    write_marker(store, marker_key(ctx, plan.index), outcome.model_dump(mode="json"))
    return outcome
