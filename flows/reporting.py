"""What a run shows in the Prefect UI: the live `shard-progress` artifact, the `run-summary` table and
the `attribute-distributions` markdown (linked from the summary), and the RunSummary they come from."""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_table_artifact, update_progress_artifact
from prefect.settings import PREFECT_UI_URL
from pydantic import BaseModel, Field

from flows.progress import ProgressMeter
from schemas.manifest import Stats
from tasks.attribute_order import in_scale_order
from tasks.describe import Bins, load_bins
from tasks.pipeline import ShardOutcome
from tasks.plan import skipped_text


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
              audio_seconds=outcome.audio_seconds)


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
