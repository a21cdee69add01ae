"""What a run shows in the Prefect UI: the live `shard-progress` artifact, the `run-summary` table and
the `attribute-distributions` markdown (linked from the summary), the RunSummary they come from, the
flow run's name (dataset and version), and the pipeline's own log records in the run's logs."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, cast
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from pydantic import BaseModel, Field

from flows.progress import ProgressMeter
from schemas.attributes import ATTRIBUTE_LABELS
from schemas.config import RunConfig
from schemas.manifest import Stats
from storage.versions import version_prefix
from tasks.attribute_order import in_scale_order
from tasks.describe import Bins, load_bins
from tasks.llm import make_backend
from tasks.pipeline import ShardOutcome
from tasks.plan import RunPlan, skipped_text
from tasks.run import RunContext, run_store


class RunSummary(BaseModel):
    dataset: str
    version: str
    location: str
    run_id: str
    clips_in: int
    skipped_files: dict[str, int] = Field(default_factory=dict)  # folder files that are not audio, by extension
    unentered_folders: dict[str, int] = Field(default_factory=dict)  # folders a walk could not enter, by reason
    rows: int
    quarantined: int
    quarantine_by_reason: dict[str, int] = Field(default_factory=dict)
    quarantine_by_stage: dict[str, int] = Field(default_factory=dict)
    audio_hours: float
    rows_without_transcript: int = 0
    # Long recordings cut inside shards, and the segments they gave (rows + quarantined = clips_in
    # - recordings_cut + segments).
    recordings_cut: int = 0
    segments: int = 0
    shards: int
    shards_skipped: int
    seconds: float
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    tokens_prompt: int = 0  # summed over the rows (0 where the LLM backend reports no usage)
    tokens_completion: int = 0
    already_committed: bool = False
    llm_backend: str = ""  # what produced the responses: backend, and model@revision
    llm_model: str = ""
    seed_attributes: list[str] = Field(default_factory=list)  # describe.attributes as shown in seeds


def show_progress(progress: UUID, meter: ProgressMeter, dataset: str) -> None:
    """Move the `shard-progress` artifact: the bar (% of clips) and, as its description, the table of
    counts, rates and ETA. The run's Artifacts tab renders each card's description and re-reads the
    artifacts every few seconds while the run is running, so this is what ops see live (a table
    artifact's data shows only on its own page, and every create with a key adds a version)."""
    update_progress_artifact(progress, progress=meter.percent(), description=meter.markdown(dataset))


def count_shard(meter: ProgressMeter, outcome: ShardOutcome) -> None:
    meter.add(outcome.clips, outcome.rows, reused=outcome.skipped, shard=True, by_reason=outcome.by_reason,
              audio_seconds=outcome.audio_seconds, recordings_cut=outcome.recordings_cut,
              segments=outcome.segments)


def artifact_link(key: str, artifact_id: UUID) -> str:
    """Markdown naming an artifact by key, linked to its UI page when PREFECT_UI_URL is known."""
    ui = PREFECT_UI_URL.value()
    return f"[`{key}`]({str(ui).rstrip('/')}/artifacts/artifact/{artifact_id})" if ui else f"`{key}`"


def summary_table(summary: RunSummary, stats: Stats) -> list[dict[str, Any]]:
    """The run-summary rows: counts, quarantine by stage and by reason, tokens, time per stage."""
    return [
        {"metric": "clips in", "value": summary.clips_in},
        *([{"metric": "skipped non-audio files", "value": skipped_text(summary.skipped_files)}]
          if summary.skipped_files else []),
        *([{"metric": "folders not entered", "value": skipped_text(summary.unentered_folders)}]
          if summary.unentered_folders else []),
        {"metric": "rows out", "value": summary.rows},
        {"metric": "quarantined", "value": summary.quarantined},
        {"metric": "rows without transcript", "value": summary.rows_without_transcript},
        *({"metric": f"quarantined by stage: {k}", "value": v} for k, v in summary.quarantine_by_stage.items()),
        *({"metric": f"quarantined by reason: {k}", "value": v} for k, v in summary.quarantine_by_reason.items()),
        {"metric": "QC failures", "value": sum(stats.qc_failures.values())},  # always there: 0 is news too
        *({"metric": f"QC failures: {k}", "value": v} for k, v in stats.qc_failures.items()),
        {"metric": "LLM backend", "value": summary.llm_backend},
        {"metric": "LLM model", "value": summary.llm_model},
        {"metric": "tokens: prompt", "value": summary.tokens_prompt},
        {"metric": "tokens: completion", "value": summary.tokens_completion},
        {"metric": "audio hours", "value": summary.audio_hours},
        {"metric": "shards (skipped)", "value": f"{summary.shards} ({summary.shards_skipped})"},
        {"metric": "seconds", "value": summary.seconds},
        *({"metric": f"seconds: {k}", "value": v} for k, v in summary.stage_seconds.items()),
    ]


def distributions_markdown(summary: RunSummary, stats: Stats, bins: Bins) -> str:
    """Each attribute's values along its scale (tasks/attribute_order.py), shares of all rows, and
    the rows the attribute is missing from: seed attributes in config order, then corpus labels."""
    rows = stats.rows
    lines = [f"# Attribute distributions: {summary.dataset} {summary.version}", "",
             f"Shares are of all {rows} rows; a row may lack an attribute (no label, no measurement).", ""]
    names = list(dict.fromkeys([*summary.seed_attributes, *sorted(stats.attribute_counts)]))
    for attr in names:
        counts = stats.attribute_counts.get(attr, {})
        without = rows - sum(counts.values())
        lines += [f"## {attr}", "", f"{rows} rows: {rows - without} with a value, {without} without {attr}", "",
                  "| value | rows | share |", "|---|---:|---|"]
        for word, n in [*in_scale_order(attr, counts, bins), ("(without)", without)]:
            share = n / rows if rows else 0.0
            lines.append(f"| {word} | {n} | {'█' * (max(1, round(20 * share)) if n else 0)} {100 * share:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def publish_artifacts(summary: RunSummary, stats: Stats, bins: Bins | None = None) -> None:
    """A human summary in the Prefect UI: counts table and attribute distributions (linked from it);
    `bins` (default: the shipped ones) give the scales' word order."""
    distributions = cast(UUID, create_markdown_artifact(  # sync here: async_dispatch types both
        key="attribute-distributions", markdown=distributions_markdown(summary, stats, bins or load_bins(None)),
        description=f"{summary.dataset} {summary.version}: attribute words over the rows"))
    create_table_artifact(
        key="run-summary", table=summary_table(summary, stats),
        description=f"{summary.dataset} {summary.version} at {summary.location}; attribute distributions: "
                    f"artifact {artifact_link('attribute-distributions', distributions)}")


def summarize(config: RunConfig, ctx: RunContext, plan: RunPlan, outcomes: list[ShardOutcome],
              version: str | None, started: float, already: bool = False) -> RunSummary:
    """The run in numbers; `version` None for a run that was not committed (its staging area is named)."""
    stage_seconds: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    for o in outcomes:
        stage_seconds.update(o.stage_seconds)
        by_stage.update(o.by_stage)
        by_reason.update(o.by_reason)
    store = run_store(config)
    backend = make_backend(config.llm)  # a constructor only: no model is loaded, no endpoint called
    model = backend.model_info()
    return RunSummary(
        llm_backend=backend.name,
        llm_model=(model.get("name") or backend.name) + (f"@{model['revision']}" if model.get("revision") else ""),
        seed_attributes=[ATTRIBUTE_LABELS[a] for a in config.describe.attributes],
        dataset=config.output.dataset,
        version=version or "not committed",
        location=store.uri(version_prefix(config.output.dataset, version) if version else ctx.staging),
        run_id=ctx.run_id,
        clips_in=plan.clips,
        skipped_files=plan.skipped_files,
        unentered_folders=plan.unentered_folders,
        rows=sum(o.rows for o in outcomes),
        quarantined=sum(o.quarantined for o in outcomes),
        quarantine_by_reason=dict(sorted(by_reason.items())),
        quarantine_by_stage=dict(sorted(by_stage.items())),
        audio_hours=round(sum(o.audio_seconds for o in outcomes) / 3600, 6),
        rows_without_transcript=sum(o.rows_without_transcript for o in outcomes),
        recordings_cut=sum(o.recordings_cut for o in outcomes),
        segments=sum(o.segments for o in outcomes),
        shards=plan.shards,
        shards_skipped=sum(o.skipped for o in outcomes),
        seconds=round(time.perf_counter() - started, 3),
        stage_seconds={k: round(v, 3) for k, v in sorted(stage_seconds.items())},
        tokens_prompt=sum(o.tokens_prompt for o in outcomes),
        tokens_completion=sum(o.tokens_completion for o in outcomes),
        already_committed=already,
    )


def name_flow_run(name: str) -> None:
    """Rename the current flow run (ops find runs by dataset and version); a failure only warns."""
    run_id = flow_run.id
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(UUID(str(run_id)), name=name)
    except Exception as exc:  # noqa: BLE001 - a cosmetic rename must never fail a committed run
        get_run_logger().warning("could not rename flow run %s to %r: %s: %s", run_id, name,
                                 type(exc).__name__, exc)


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, but silent outside a flow or task run (plain runs, unit tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        super().emit(record)


# Our loggers: the pipeline's ("speechpairs.*") and the modules' own (`__name__`: storage.versions' commit
# lines, storage.lease, tasks.*).
PIPELINE_LOGGERS = ("speechpairs", "storage", "tasks")


def forward_pipeline_logs(names: tuple[str, ...] = PIPELINE_LOGGERS) -> None:
    """Send the plain-Python pipeline's records (quarantined clips by shard and clip id, commit lines)
    to the run's logs in the Prefect UI, from INFO up: left unset, these loggers would inherit the
    root's WARNING and drop INFO before any handler. What the console shows is the console handler's
    business (the CLI raises it to WARNING). Runs when the flow module is imported, so shard tasks in
    worker processes (process, Dask, Ray runners) forward theirs too; a no-op for a logger that
    already has an API handler (e.g. named in PREFECT_LOGGING_EXTRA_LOGGERS)."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(_RunLogHandler())
