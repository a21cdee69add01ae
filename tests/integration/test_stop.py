"""SIGTERM / SIGINT stop a run within seconds, leave staging consistent, say so, and a re-run resumes.

The real `speechpairs run` in a subprocess against the session Prefect server, with an LLM stand-in
that takes 30 s per answer: without a cooperative stop, the process would sit until those answers
came back (the shard threads keep the interpreter alive), and the first SIGTERM looked ignored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from storage.reader import open_dataset
from tests.support.fake_llm_server import FakeLLMServer
from tests.support.paths import REPO

SAMPLE = REPO / "examples" / "sample_corpus"
pytestmark = pytest.mark.slow


def _corpus(path: Path) -> list[str]:
    ids = []
    with path.open("w") as f:
        for line in (SAMPLE / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rec["path"] = str(SAMPLE / rec["path"])
            rec["transcript"] = f"{rec.get('transcript') or ''} clip={rec['id']}".strip()
            f.write(json.dumps(rec) + "\n")
            ids.append(f"s/{rec['id']}")
    return ids


def _start(config: Path, env: dict[str, str], logs: Path) -> tuple[subprocess.Popen[bytes], Path]:
    err = logs.with_suffix(".err")
    with logs.with_suffix(".out").open("wb") as out, err.open("wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"],
                                cwd=REPO, env=env, stdout=out, stderr=fe, start_new_session=True)
    return proc, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_within_seconds_and_a_rerun_resumes(
        sig: signal.Signals, prefect_api: str, tmp_path: Path) -> None:
    ids = _corpus(tmp_path / "m.jsonl")
    server = FakeLLMServer(ok_delay_s=30.0).start()  # a model that answers after 30 s
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "ph"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))
    root = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [{"path": str(tmp_path / "m.jsonl"), "dataset": "s", "language": "en",
                     "allowed_roots": [str(SAMPLE)]}],
        "output": {"root": str(root), "dataset": "stop", "shard_size": 3},
        "llm": {"backend": "openai", "base_url": server.base_url, "model": "fake-served-model",
                "concurrency": 4, "timeout_s": 120, "qc": {"min_words": 1}},
        "max_workers": 2}))
    try:
        proc, err = _start(config, env, tmp_path / "first")
        deadline = time.monotonic() + 120
        while not server.seen:  # wait until requests are in flight
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "no LLM request within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)
        signalled = time.monotonic()
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - signalled
        stderr = err.read_text()
        assert rc == 128 + sig, stderr
        assert took < 10, f"took {took:.1f} s to stop\n{stderr}"
        assert f"interrupted ({sig.name})" in stderr and "Traceback" not in stderr, stderr
        assert "No shard was finished" in stderr  # nothing to resume from: no "run again to resume"
        sent_at_exit = len(server.seen)
        time.sleep(0.5)
        assert len(server.seen) == sent_at_exit  # nothing keeps working after the process is gone
        assert sent_at_exit < len(ids)  # the stop came before every clip was asked for
        staging = next((root / "stop" / "_staging").iterdir())
        assert not list((staging / "markers").glob("*.json"))  # abandoned shards are not marked done
        assert not (staging / "committed.json").exists() and not (root / "stop" / "v0001").exists()
        # The model is fast again: the same command resumes and commits every clip exactly once.
        server.ok_delay_s = 0.0
        proc, err = _start(config, env, tmp_path / "second")
        assert proc.wait(timeout=180) == 0, err.read_text()
    finally:
        server.stop()

    rows = open_dataset(f"{root}/stop@v0001").to_arrow(["id"]).column("id").to_pylist()
    assert sorted(rows) == sorted(ids)
