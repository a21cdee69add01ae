"""One shard end to end: clips → measured → described → LLM under QC → staged Parquet + quarantine,
then the shard's outcome and completion marker.

One call processes one shard in plain Python; the flow wraps it in a single Prefect task run.
Clips move through in micro-batches so memory stays bounded by the batch, not the shard, and the
LLM backend still sees many requests at once. Every clip ends as a row or a quarantine row; an
unexpected error in one clip quarantines that clip with the stage, never the whole shard. A shard
whose marker exists for the same config is returned as recorded (resume).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from schemas.arrow import (
    QUARANTINE_SCHEMA,
    ROW_SCHEMA,
    ROW_SCHEMA_VERSION,
    quarantine_to_table,
    rows_to_table,
)
from schemas.config import RunConfig
from schemas.manifest import ShardInfo
from schemas.records import Clip, Features, QuarantineError, QuarantineRow, utc_now
from storage.objectstore import ObjectStore
from storage.shards import ParquetShardWriter, read_marker, write_marker, write_parquet_shard
from tasks.clip_cache import ClipRecorder, clip_key, load_index, replay
from tasks.commit_gate import QuarantineExample, shard_needs_redo
from tasks.describe import Bins, load_bins
from tasks.features.models import LoadedModels, load_models
from tasks.gpu import StageGate, no_gate
from tasks.llm import LLMBackend, LLMResult, make_backend
from tasks.llm.cache import CachedBackend
from tasks.measure import Measured, measure_batch
from tasks.plan import ShardPlan
from tasks.regenerate import generate_with_qc
from tasks.rows import Prepared, build_row, describe_clip
from tasks.run import RunContext
from tasks.segment.clips import shard_clips
from tasks.stopping import check_stop
from tasks.tally import ShardTally

# The same logger as the quarantine lines (tasks/tally.py): the flow forwards "speechpairs" records.
log = logging.getLogger("speechpairs.pipeline")


@dataclass(frozen=True)
class Progress:
    """One report to a ProgressHook (the CLI's progress bar): counts added since the last report.

    `clips` are planned clips (a long recording counts once, when its last segment is through);
    `rows` and `quarantined` are what came out (whole clips, recordings that failed whole, and
    segments), `recordings_cut`/`segments` the recordings cut so far and the segments they gave.
    Summed over a run they equal the run summary's clips_in, rows, quarantined, recordings_cut and
    segments. Kinds: "total" once planned (`clips` = the run's planned clips), "done" per finished
    batch, "reused" for a shard an earlier attempt finished (a rate must not count it)."""

    kind: Literal["total", "done", "reused"]
    clips: int
    rows: int = 0
    quarantined: int = 0
    recordings_cut: int = 0
    segments: int = 0

    def minus(self, earlier: Progress) -> Progress:
        return Progress(self.kind, self.clips - earlier.clips, self.rows - earlier.rows,
                        self.quarantined - earlier.quarantined, self.recordings_cut - earlier.recordings_cut,
                        self.segments - earlier.segments)

    def empty(self) -> bool:
        return not (self.clips or self.rows or self.quarantined or self.recordings_cut or self.segments)


# Passed down from the caller; shard tasks in other processes get None.
ProgressHook = Callable[[Progress], None]


def report_total(progress: ProgressHook | None, clips: int) -> None:
    if progress is not None:
        progress(Progress("total", clips))


def report_reused(progress: ProgressHook | None, outcome: ShardOutcome) -> None:
    """A shard an earlier attempt finished: its whole outcome at once."""
    if progress is not None:
        progress(Progress("reused", outcome.clips, outcome.rows, outcome.quarantined, outcome.recordings_cut,
                          outcome.segments))


def _report_since(progress: ProgressHook | None, acc: ShardTally, sent: Progress) -> Progress:
    """Report what the shard's tally gained since `sent` (the last report's totals); returns the totals."""
    now = Progress("done", acc.refs_done, acc.n_rows, len(acc.quarantine), acc.recordings_cut, acc.segments)
    delta = now.minus(sent)
    if progress is not None and not delta.empty():
        progress(delta)
    return now


class ShardOutcome(BaseModel):
    """What a finished shard reports (its completion marker): counts, seconds, tokens, staged files."""

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
    # Long recordings cut inside the shard: recordings that gave >= 1 segment, and those segments
    # (each a row or a quarantine row of its own: rows + quarantined = clips - recordings_cut + segments).
    recordings_cut: int = 0
    segments: int = 0
    # The row schema the staged shard was written with: a marker from before the current one is redone
    # (its Parquet lacks a column the version's schema has); the request cache keeps that cheap.
    row_schema: int = 1
    examples: dict[str, QuarantineExample] = Field(default_factory=dict)  # the first clip per reason
    shard: ShardInfo | None = None
    quarantine: ShardInfo | None = None
    config_hash: str
    skipped: bool = False


def run_backend(config: RunConfig, store: ObjectStore, ctx: RunContext) -> LLMBackend:
    """The run's LLM backend; with `llm.cache` finished requests live in the run's staging area, so
    a retried shard or a resumed run never asks the model twice for the same request."""
    backend = make_backend(config.llm)
    return CachedBackend(backend, store, ctx.staging, config=config.llm) if config.llm.cache else backend


def finished_outcome(store: ObjectStore, ctx: RunContext, index: int, *, redo: bool = True) -> ShardOutcome | None:
    """The outcome recorded by an earlier attempt of this shard with the same config, if any.

    With `redo`, a shard whose clips a re-run should retry (transient failures; model-stage failures
    after a refused commit) counts as unfinished, so it is processed again."""
    payload = read_marker(store, ctx.layout.marker(index))
    if payload is None:
        return None
    outcome = ShardOutcome.model_validate(payload)
    if outcome.config_hash != ctx.config_hash:
        return None
    if outcome.row_schema != ROW_SCHEMA_VERSION:
        log.info("shard %05d: redoing it, staged with an older row schema", index)
        return None
    if redo and shard_needs_redo(outcome.by_reason, outcome.by_stage, ctx.after_refusal):
        log.info("shard %05d: redoing it, an earlier attempt quarantined clips a re-run retries (%s)",
                 index, ", ".join(f"{k}={v}" for k, v in sorted(outcome.by_reason.items())))
        return None
    return outcome


def process_shard(plan: ShardPlan, config: RunConfig, store: ObjectStore, ctx: RunContext,
                  backend: LLMBackend, batch_size: int | None = None, gate: StageGate = no_gate,
                  progress: ProgressHook | None = None) -> ShardOutcome:
    """Process one planned shard end to end, idempotently: a finished shard is returned as is.

    `gate(stage)` is entered around every model stage (asr, classify, llm) so that shards running
    in parallel never share a GPU at once; `progress` hears of every finished batch.
    """
    # Enough requests per LLM call to keep every concurrency slot busy while stragglers finish.
    batch_size = batch_size or max(64, 2 * config.llm.concurrency)
    done = finished_outcome(store, ctx, plan.index)
    if done is not None:
        report_reused(progress, done)
        return done.model_copy(update={"skipped": True})
    bins = load_bins(config.describe.bins)
    models = load_models(config.features)
    if isinstance(backend, CachedBackend):  # a resumed shard reads its own cached results, not the run's
        backend = backend.scoped(ctx.layout.cache_scope(plan.index))
    acc = ShardTally(shard=plan.index, run_id=ctx.run_id, created_at=plan.created_at or utc_now(), gate=gate)
    layout, index = ctx.layout, plan.index
    # Measured clips (and their audio) come from the clip cache when an earlier run measured this
    # shard the same way; otherwise they are measured here and recorded for the next run.
    key = clip_key(config, ctx, plan)
    cached = load_index(store, layout.dataset, key)
    recorder: ClipRecorder | None = None
    if cached is not None:
        measured_batches = replay(store, cached, acc, batch_size)
    else:
        recorder = ClipRecorder(store, layout.dataset, key, config, acc)
        measured_batches = recorder.record(_measure(plan, config, acc, models, batch_size))
    # Uploaded once, to its immutable data key (content hash in the name); the commit only references it.
    try:
        with ParquetShardWriter(store, lambda sha: layout.data_shard(index, sha), ROW_SCHEMA,
                                compression=config.output.compression) as writer:
            sent = Progress("done", 0)  # the shard's totals last reported
            for measured in measured_batches:
                check_stop(f"shard {plan.index:05d}")
                prepared = describe_batch(measured, config, bins, acc)
                t0 = time.perf_counter()
                results: list[LLMResult | QuarantineError] = []
                if prepared:
                    with gate("llm"):
                        results = generate_with_qc(prepared, backend, config, acc.qc_failures)
                acc.stage_seconds["llm"] += time.perf_counter() - t0
                rows = [row for p, r in zip(prepared, results, strict=True)
                        if (row := build_row(p, r, config, ctx, acc, backend)) is not None]
                t0 = time.perf_counter()
                writer.write(rows_to_table(rows))  # streamed: the shard is never held in memory
                acc.n_rows += len(rows)
                acc.stage_seconds["write"] += time.perf_counter() - t0
                sent = _report_since(progress, acc, sent)
            # Recordings dropped whole after the last full batch (no speech, unreadable) are reported here.
            _report_since(progress, acc, sent)
            if recorder is not None:  # measured here: upload the audio file, then the cache index
                audio = recorder.finish()
            else:
                assert cached is not None
                audio = cached.file
            t0 = time.perf_counter()
            shard = writer.close()
            acc.stage_seconds["write"] += time.perf_counter() - t0
    finally:
        if recorder is not None:
            recorder.abort()
    if shard is not None:
        shard = shard.model_copy(update={"audio": audio})
    return _write_outcome(plan, store, ctx, config, acc, shard)


def _measure(plan: ShardPlan, config: RunConfig, acc: ShardTally, models: LoadedModels,
             batch_size: int) -> Iterator[list[Measured]]:
    """The shard's clips (recordings cut into segments) measured batch by batch."""
    for batch in _batches(shard_clips(plan.refs, config, acc), batch_size):
        check_stop(f"shard {plan.index:05d}")
        yield measure_batch(batch, config, acc, models)


def describe_batch(measured: list[Measured], config: RunConfig, bins: Bins, acc: ShardTally) -> list[Prepared]:
    return [p for p in (describe_clip(m, config, bins, acc) for m in measured) if p is not None]


def prepare_batch(batch: list[Clip], config: RunConfig, bins: Bins, acc: ShardTally,
                  models: LoadedModels) -> list[Prepared]:
    """Decode + DSP per clip, then Whisper and classifiers per batch, then describe per clip."""
    return describe_batch(measure_batch(batch, config, acc, models), config, bins, acc)


def measure_clips(clips: list[Clip], config: RunConfig, bins: Bins, models: LoadedModels,
                  ) -> tuple[list[Features], list[QuarantineRow]]:
    """Each clip's features exactly as a run resolves them (DSP, Whisper rates, classifiers, labels),
    and the quarantine rows of the clips a run would drop; for calibration, outside any shard."""
    acc = ShardTally()
    return [p.features for p in prepare_batch(clips, config, bins, acc, models)], acc.quarantine


def _batches(items: Iterable[Clip], size: int) -> Iterator[list[Clip]]:
    batch: list[Clip] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_outcome(plan: ShardPlan, store: ObjectStore, ctx: RunContext, config: RunConfig,
                   acc: ShardTally, shard: ShardInfo | None) -> ShardOutcome:
    if acc.unlogged:
        log.warning("shard %05d: %d more quarantined clips not logged one by one (%s); the quarantine Parquet "
                    "lists every clip", plan.index, sum(acc.unlogged.values()),
                    ", ".join(f"{k}={v}" for k, v in sorted(acc.unlogged.items())))
    t0 = time.perf_counter()
    compression = config.output.compression
    quarantine = None
    if acc.quarantine:
        qtable = quarantine_to_table(acc.quarantine).cast(QUARANTINE_SCHEMA)
        layout, index = ctx.layout, plan.index
        quarantine = write_parquet_shard(store, lambda sha: layout.data_quarantine(index, sha), qtable,
                                         compression=compression)
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
        recordings_cut=acc.recordings_cut,
        segments=acc.segments,
        row_schema=ROW_SCHEMA_VERSION,
        examples=acc.examples,
        shard=shard,
        quarantine=quarantine,
        config_hash=ctx.config_hash,
    )
    expected = outcome.clips - outcome.recordings_cut + outcome.segments
    if outcome.rows + outcome.quarantined != expected:
        cut = (f" ({outcome.recordings_cut} recordings cut into {outcome.segments} segments)"
               if outcome.recordings_cut else "")
        raise RuntimeError(f"shard {plan.index}: {outcome.clips} clips in{cut} but {outcome.rows} rows + "
                           f"{outcome.quarantined} quarantined out; refusing to mark it complete")
    write_marker(store, ctx.layout.marker(plan.index), outcome.model_dump(mode="json"))
    return outcome
