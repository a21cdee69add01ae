"""A `speechpairs run` from the CLI: INFO lines reach the Prefect API, the console stays quiet.

The CLI runs in a subprocess against the session harness's server (the `prefect_api` fixture);
the test then reads the flow run's logs and task runs back through the Prefect client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import REPO

SAMPLE = REPO / "examples" / "sample_corpus"


def _config(tmp_path: Path, clips: int) -> Path:
    """A small manifest outside the sample folder (its audio allowed by `allowed_roots`), shards of one."""
    lines = (SAMPLE / "manifest.jsonl").read_text().splitlines()[:clips]
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps({**json.loads(x), "path": str(SAMPLE / json.loads(x)["path"])}) + "\n"
                                for x in lines))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [{"path": str(manifest), "dataset": "logs", "language": "en", "allowed_roots": [str(SAMPLE)]}],
        "output": {"root": str(tmp_path / "out"), "dataset": "logs", "shard_size": 1},
        "llm": {"backend": "template"}}))
    return config


def _read_logs(flow_run_id: str, want: list[str]) -> list[Any]:
    """The flow run's log records once every pattern in `want` is there (or after 30 s)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if all(any(re.search(p, r.message) for r in logs) for p in want) or time.monotonic() > deadline:
                return list(logs)
            time.sleep(0.5)


def test_cli_run_sends_info_lines_to_the_api_and_names_task_runs(tmp_path: Path, prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               SPEECHPAIRS_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    env.pop("PREFECT_LOGGING_LEVEL", None)  # conftest sets WARNING for the test process; a user's CLI has none
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(_config(tmp_path, 2)), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    assert "logs committed v0001" in proc.stdout
    assert not (tmp_path / "home").exists(), "an explicit PREFECT_API_URL must not start a local server"

    # The UI link of the flow run, printed at the start (stderr) and in the summary (stdout).
    links = re.findall(r"/runs/flow-run/([0-9a-f-]{36})", console)
    assert len(set(links)) == 1 and len(links) == 2, console
    flow_run_id = links[0]
    assert f"flow run:     {prefect_api.removesuffix('/api')}/runs/flow-run/{flow_run_id}" in proc.stdout

    shard_lines = [r"^shard 00000 done: 1 rows, 0 quarantined \(\d/2 shards\)$",
                   r"^shard 00001 done: 1 rows, 0 quarantined \(\d/2 shards\)$"]
    commit_lines = [r"^committing logs v0001 \(parent None\) to ", r"^committed logs v0001: 2 rows, 0 quarantined \(none\)$"]
    logs = _read_logs(flow_run_id, shard_lines + commit_lines)
    messages = [r.message for r in logs]
    for pattern in shard_lines + commit_lines:
        found = [r for r in logs if re.search(pattern, r.message)]
        assert len(found) == 1, (pattern, messages)
        assert found[0].level == 20, (pattern, found[0].level)  # INFO
    assert not [m for m in messages if "{}" in m], messages  # no empty dict printed as {}

    # None of those lines on the console: it shows the summary (and warnings) only.
    for text in ("shard 00000 done", "shard 00001 done", "committing logs", "committed logs v0001:",
                 "Beginning flow run", "Finished in state"):
        assert text not in console, (text, console)

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        assert sorted(r.name for r in runs) == ["commit-version", "plan-shards", "shard-00000", "shard-00001"]
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.name == "generate-logs-v0001" and flow_run.state is not None and flow_run.state.is_completed()
