"""A corpus folder the run cannot enter, seen by an unprivileged process (setpriv in a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.objectstore import open_store
from storage.versions import file_key, read_manifest
from tests.support.hostile_tree import (
    FLAC,
    REPO,
    SHORT,
    SPEECH,
    copy,
)


@pytest.mark.timeout(300)
def test_an_unreadable_sub_directory_is_a_quarantine_row_not_a_silent_loss() -> None:
    """Root reads everything, so the run goes to an unprivileged uid (nobody) in a subprocess."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop to an unprivileged uid")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to uid 65534 (and a non-root user cannot make a folder unreadable "
                    "to itself while keeping the test's own checks)")
    work = Path(tempfile.mkdtemp(prefix="speechpairs-unreadable-", dir="/tmp"))
    try:
        root = work / "corpus"
        copy(SPEECH, root / "ok.wav")
        copy(SHORT, root / "open" / "b.wav")
        copy(FLAC, root / "locked" / "c.flac")
        (work / "out").mkdir()
        (work / "home").mkdir()
        for path in [work, root, root / "open", root / "ok.wav", root / "open" / "b.wav"]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (work / "out").chmod(0o777)
        (work / "home").chmod(0o777)
        (root / "locked").chmod(0o000)
        config = {"sources": [{"path": str(root), "dataset": "u"}],
                  "output": {"root": str(work / "out"), "dataset": "locked", "shard_size": 4,
                             "max_quarantine_ratio": 1.0}}
        script = ("import json, sys\n"
                  "from flows.generate import run_plain\nfrom tasks.run import run_context\n"
                  "from schemas.config import parse_config\n"
                  "from storage.objectstore import open_store\n"
                  "from tasks.plan import load_plan\n"
                  "config = parse_config(json.loads(sys.argv[1]), environ={})\n"
                  "manifest = run_plain(config)\n"
                  "plan = load_plan(open_store(config.output.root), run_context(config).staging)\n"
                  "print(json.dumps({'version': manifest.lineage.version, 'clips': plan.clips,\n"
                  "                  'unentered': plan.unentered_folders}))\n")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work / "home"),
               "PREFECT_HOME": str(work / "home" / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(work / "home")}
        probe = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "true"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"setpriv cannot switch to uid 65534 here: {probe.stderr.strip()}")
        done = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               script, json.dumps(config)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=280, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["clips"] == 3 and report["unentered"] == {"unreadable": 1}
        manifest = read_manifest(open_store(str(work / "out")), "locked", report["version"])
        rows = {r["id"] for s in manifest.shards for r in pq.read_table(work / "out" / file_key(manifest, s)).to_pylist()}
        quarantine = [q for s in manifest.quarantine
                      for q in pq.read_table(work / "out" / file_key(manifest, s)).to_pylist()]
        assert rows == {"u/ok", "u/open/b"}
        assert [(q["id"], q["reason_code"], q["stage"]) for q in quarantine] == [("u/locked/", "unreadable", "ingest")]
        message = quarantine[0]["message"]
        assert f"{root / 'locked'}: cannot list this folder (Permission denied)" in message
        assert "its clips are left out" in message and "chmod a+rx" in message
    finally:
        (work / "corpus" / "locked").chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)
