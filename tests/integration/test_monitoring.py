"""What ops see in the Prefect UI: progress, run summary, run names and failures, read back via the API."""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from flows.generate import run_generate
from schemas.config import RunConfig, load_config
from storage.objectstore import open_store
from storage.versions import file_key, read_manifest
from tasks.llm import make_backend
from tasks.pipeline import ShardOutcome, process_shard
from tasks.plan import load_shard_plan, plan_run
from tests.support.paths import REPO

GHOST = "ghost_clip"  # a manifest row whose audio file does not exist: quarantined at the audio stage


def corpus_with_a_missing_file(tmp_path: Path, sample_corpus: Path) -> Path:
    manifest = tmp_path / "m.jsonl"
    with manifest.open("w") as f:
        for line in (sample_corpus / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            f.write(json.dumps(rec | {"path": str(sample_corpus / rec["path"])}) + "\n")
        f.write(json.dumps({"id": GHOST, "path": str(tmp_path / "nowhere" / "ghost.wav"), "transcript": "gone"}) + "\n")
    return manifest


def config_for(tmp_path: Path, manifest: Path, dataset: str) -> RunConfig:
    return load_config(REPO / "examples" / "quickstart.yaml",
                       [f"output.root={tmp_path / 'out'}", f"sources.0.path={manifest}", "sources.0.dataset=mon",
                        f"sources.0.allowed_roots=[{REPO / 'examples' / 'sample_corpus'}]",
                        f"output.dataset={dataset}", "output.shard_size=4"], environ={})


@pytest.fixture
def flow_info_logs() -> Iterator[None]:
    """The tests run with PREFECT_LOGGING_LEVEL=WARNING; let the flow's INFO lines reach the API too."""
    logger = logging.getLogger("prefect.flow_runs")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)


def _flow_run(client: Any, name: str) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert len(runs) == 1, [r.name for r in runs]
    return runs[0]


def _logs(client: Any, flow_run_id: Any, pattern: str, *, want: int = 1) -> list[Any]:
    """The run's log records matching pattern, waiting briefly for the background log worker."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    deadline = time.monotonic() + 15
    while True:
        APILogHandler().flush()  # drains the background log worker
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        found = [log for log in logs if re.search(pattern, log.message)]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def progress_fields(description: str) -> dict[str, str]:
    """The `| name | value |` rows of the progress artifact's description."""
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", description, re.MULTILINE)[1:])  # [0]: header


@pytest.mark.usefixtures("prefect_harness", "flow_info_logs")
def test_ui_shows_progress_summary_run_name_and_quarantined_clips(tmp_path: Path, sample_corpus: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    import flows.reporting

    updates: list[dict[str, str]] = []  # every live update, as sent (the real call still goes to the API)
    real_update = flows.reporting.update_progress_artifact

    def recording(artifact_id: Any, progress: float, description: str | None = None) -> Any:
        updates.append({"progress": str(progress), **progress_fields(description or "")})
        return real_update(artifact_id, progress=progress, description=description)

    monkeypatch.setattr(flows.reporting, "update_progress_artifact", recording)
    config = config_for(tmp_path, corpus_with_a_missing_file(tmp_path, sample_corpus), "monitoring")
    summary = run_generate(config)
    assert (summary.clips_in, summary.rows, summary.quarantined, summary.shards) == (11, 10, 1, 3)
    assert summary.quarantine_by_stage == {"audio": 1} and summary.quarantine_by_reason == {"missing_file": 1}
    manifest = read_manifest(open_store(str(tmp_path / "out")), "monitoring", "v0001")
    rows = [r for s in manifest.shards
            for r in pq.read_table(tmp_path / "out" / file_key(manifest, s),
                                   columns=["generation"]).to_pylist()]
    assert summary.tokens_completion == sum(r["generation"]["completion_tokens"] or 0 for r in rows) > 0
    assert summary.tokens_prompt == sum(r["generation"]["prompt_tokens"] or 0 for r in rows)

    with get_client(sync_client=True) as client:
        run = _flow_run(client, "generate-monitoring-v0001")  # renamed once the version was committed
        artifacts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))}
        assert {"shard-progress", "run-summary", "attribute-distributions"} <= set(artifacts)
        assert artifacts["shard-progress"].type == "progress" and artifacts["shard-progress"].data == 100
        # The card's description is the live table: final counts, rates and an ETA of 0 s.
        live = progress_fields(artifacts["shard-progress"].description or "")
        assert {k: live[k] for k in ("shards done", "clips done", "rows", "quarantined",
                                     "quarantined: missing_file", "ETA")} == {
            "shards done": "3/3", "clips done": "11/11", "rows": "10", "quarantined": "1",
            "quarantined: missing_file": "1", "ETA": "0 s"}
        assert float(live["audio hours"]) == pytest.approx(summary.audio_hours, abs=1e-4)
        assert float(live["clips/s"]) > 0 and float(live["audio hours per hour"]) > 0
        # Moved once planned, then as each shard finished (in whatever order they did).
        assert [u["shards done"] for u in updates] == ["0/3", "1/3", "2/3", "3/3"]
        done = [int(u["clips done"].split("/")[0]) for u in updates]
        assert done[0] == 0 and done == sorted(done) and done[-1] == 11
        assert updates[0]["ETA"].startswith("unknown") and all(u["ETA"] for u in updates)
        assert [float(u["progress"]) for u in updates][-1] == 100.0

        summary_artifact = artifacts["run-summary"]
        data = summary_artifact.data
        table = {r["metric"]: r["value"] for r in (json.loads(data) if isinstance(data, str) else data)}
        assert table["tokens: prompt"] == summary.tokens_prompt
        assert table["tokens: completion"] == summary.tokens_completion
        assert table["quarantined by stage: audio"] == 1 and table["quarantined by reason: missing_file"] == 1
        assert {k: v for k, v in table.items() if k.startswith("seconds: ")} == {
            f"seconds: {k}": v for k, v in summary.stage_seconds.items()}
        assert "seconds: llm" in table and "seconds: audio" in table
        assert table["audio hours"] == summary.audio_hours and table["rows out"] == 10
        assert table["QC failures"] == 0  # always listed, even when no response failed
        assert (table["LLM backend"], table["LLM model"]) == ("template", "template@1")

        distributions = artifacts["attribute-distributions"].data
        assert isinstance(distributions, str)
        sections = {part.split("\n", 1)[0]: part for part in distributions.split("\n## ")[1:]}
        assert list(sections)[:8] == ["Gender", "Emotion", "Age", "Accent", "Pitch", "Speaking speed", "Volume",
                                      "Noise level"]  # describe.attributes' order
        manifest = read_manifest(open_store(str(tmp_path / "out")), "monitoring", "v0001")
        for name, section in sections.items():
            counts = manifest.stats.attribute_counts.get(name, {})
            with_value = sum(counts.values())
            assert f"10 rows: {with_value} with a value, {10 - with_value} without {name}" in section
            listed = re.findall(r"^\| ([^|]+?) \| (\d+) \|", section, re.MULTILINE)  # data rows only
            assert listed[-1] == ("(without)", str(10 - with_value))
            assert dict(listed[:-1]) == {k: str(v) for k, v in counts.items()}
        pitch = [v for v, _ in re.findall(r"^\| ([^|]+?) \| (\d+) \|", sections["Pitch"], re.MULTILINE)[:-1]]
        scale = ["Very low", "Low", "Normal", "High", "Very high"]
        assert pitch == sorted(pitch, key=scale.index) and len(pitch) >= 2  # along the scale, not by count
        description = summary_artifact.description or ""
        assert "monitoring v0001" in description and "attribute-distributions" in description

        # One WARNING per quarantined clip, naming shard and clip, attributed to that shard's task run.
        (warning,) = _logs(client, run.id, rf"clip mon/{GHOST}: quarantined at audio \(missing_file\)")
        shard = re.match(r"shard (\d{5}) clip", warning.message)
        assert warning.level == logging.WARNING and shard is not None
        assert warning.task_run_id is not None
        assert client.read_task_run(warning.task_run_id).name == f"shard-{shard.group(1)}"

        # One INFO line per shard as it finishes, counting up to all shards.
        done = _logs(client, run.id, r"^shard \d{5} done: ", want=3)
        assert sorted(re.search(r"\((\d)/3 shards\)", d.message).group(1) for d in done) == ["1", "2", "3"]
        assert any(f"shard {shard.group(1)} done: 3 rows, 1 quarantined" in d.message for d in done)
        assert len(_logs(client, run.id, r"quarantined at ", want=0)) == 1  # good clips log nothing per clip


@pytest.mark.usefixtures("prefect_harness")
def test_a_failed_rename_warns_and_the_run_still_commits(tmp_path: Path, sample_corpus: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client

    import flows.reporting

    def broken(*args: object, **kwargs: object) -> Any:
        raise ConnectionError("API went away")

    monkeypatch.setattr(flows.reporting, "get_client", broken)
    summary = run_generate(config_for(tmp_path, corpus_with_a_missing_file(tmp_path, sample_corpus), "unrenamed"))
    assert summary.version == "v0001" and summary.rows == 10
    with get_client(sync_client=True) as client:
        run = _flow_run(client, "generate-unrenamed")
        assert run.state is not None and run.state.is_completed()
        (warning,) = _logs(client, run.id, r"could not rename flow run .*generate-unrenamed-v0001")
        assert "API went away" in warning.message


def test_shard_logs_each_quarantined_clip_and_sums_tokens(tmp_path: Path, sample_corpus: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Outside Prefect the pipeline logs plainly (no 'no flow run' warnings from the API handler)."""
    import flows.generate  # noqa: F401 - installs the forwarding handler, which must stay silent here

    config = config_for(tmp_path, corpus_with_a_missing_file(tmp_path, sample_corpus), "plain")
    from tasks.run import run_context

    ctx = run_context(config)
    store = open_store(str(tmp_path / "out"))
    plan = plan_run(config, store, ctx.staging, ctx.run_id)
    backend = make_backend(config.llm)
    outcomes: list[ShardOutcome] = []
    with caplog.at_level(logging.INFO, logger="speechpairs"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a MissingContextError warning from the API handler would fail here
        for i in range(plan.shards):
            outcomes.append(process_shard(load_shard_plan(store, ctx.staging, i), config, store, ctx, backend))
    records = [r for r in caplog.records if r.name.startswith("speechpairs")]
    (bad,) = [o for o in outcomes if o.quarantined]
    assert len(records) == 1 and records[0].levelno == logging.WARNING  # nothing per good clip
    assert records[0].getMessage().startswith(
        f"shard {bad.index:05d} clip mon/{GHOST}: quarantined at audio (missing_file): "
        f"{tmp_path / 'nowhere' / 'ghost.wav'}: file not found")
    assert sum(o.tokens_completion for o in outcomes) > 0 and all(o.tokens_prompt == 0 for o in outcomes)
    # A completion marker written before token counts existed still reads back.
    old = outcomes[0].model_dump(mode="json")
    del old["tokens_prompt"], old["tokens_completion"]
    assert ShardOutcome.model_validate(old).tokens_completion == 0
