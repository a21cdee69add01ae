"""CLI benchmark: what `speechpairs run` costs around the flow, with a cold and a warm local server.

Runs `speechpairs run` on examples/quickstart.yaml's settings with a 2-clip corpus (2 rows of the
sample manifest in a temp folder, the audio folder in `allowed_roots`), each run into a fresh
output root so every run does the same work, in an isolated data folder (SPEECHPAIRS_HOME):

1. cold, first use: no server and no database (the first `make demo` on a machine); it also starts
   the warm launcher (flows/launcher/) in the background, which the bench waits for;
2. warm: the server and the launcher the first run left (median of --warm-runs);
3. warm server, launcher off (SPEECHPAIRS_LAUNCHER=off): each run imports Prefect and the pipeline itself;
4. cold, restart: after `speechpairs server stop`, the database already there.

Wall time is the whole process (interpreter start to exit); the CLI prints `time taken: X s
(flow Y s)`, Y being the flow's own time. Target: a warm run adds at most 3 s to the flow's own
time (wall - flow <= 3 s). The server is stopped at the end (`speechpairs server stop`, by PID).

    .venv/bin/python bench/cli.py [--warm-runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "sample_corpus"
QUICKSTART = REPO / "examples" / "quickstart.yaml"
TARGET_S = 3.0
TAKEN = re.compile(r"time taken:\s+([\d.]+) s \(flow ([\d.]+) s\)")


def make_config(work: Path) -> Path:
    """quickstart.yaml with its source swapped for a 2-row manifest in `work`."""
    lines = (SAMPLE / "manifest.jsonl").read_text().splitlines()[:2]
    corpus = work / "corpus"
    corpus.mkdir()
    (corpus / "manifest.jsonl").write_text(
        "".join(json.dumps({**json.loads(x), "path": str(SAMPLE / json.loads(x)["path"])}) + "\n" for x in lines))
    config = yaml.safe_load(QUICKSTART.read_text())
    config["sources"] = [{**config["sources"][0], "path": str(corpus / "manifest.jsonl"),
                          "allowed_roots": [str(SAMPLE)]}]
    path = work / "quickstart-2clips.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    return time.perf_counter() - started, proc


def wait_for_launcher(log: Path, timeout: float = 180.0) -> float:
    """Seconds until the launcher the first run started says it is ready (it imports in the background)."""
    started = time.monotonic()
    while "ready in" not in (log.read_text() if log.exists() else ""):
        if time.monotonic() - started > timeout:
            sys.exit(f"the warm launcher did not become ready in {timeout:.0f} s; see {log}")
        time.sleep(0.2)
    return time.monotonic() - started


def timed_run(env: dict[str, str], config: Path, out: Path) -> tuple[float, float, float]:
    """(wall, time taken, flow) of one `speechpairs run`."""
    wall, proc = cli(env, "run", str(config), "--no-progress", "--set", f"output.root={out}")
    found = TAKEN.search(proc.stdout)
    if proc.returncode != 0 or not found:
        sys.exit(f"speechpairs run failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, float(found[1]), float(found[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-runs", type=int, default=3, help="warm runs (the median is reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, SPEECHPAIRS_HOME=str(work / "home"), PREFECT_HOME=str(work / "client-prefect-home"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", SPEECHPAIRS_LAUNCHER="on")
        env.pop("PREFECT_API_URL", None)  # the local server is what is measured
        config = make_config(work)
        load = os.getloadavg()[0]
        try:
            rows = [("cold, first use (creates the database)", *timed_run(env, config, work / "out-cold"))]
            ready = wait_for_launcher(work / "home" / "prefect" / "launcher.log")
            warm = [timed_run(env, config, work / f"out-warm-{i}") for i in range(args.warm_runs)]
            off = dict(env, SPEECHPAIRS_LAUNCHER="off")
            no_launcher = [timed_run(off, config, work / f"out-off-{i}") for i in range(args.warm_runs)]
            cli(env, "server", "stop")
            rows.append(("cold, restart (database exists)", *timed_run(env, config, work / "out-restart")))
        finally:
            cli(env, "server", "stop")
        median = tuple(statistics.median(r[i] for r in warm) for i in range(3))
        rows.insert(1, (f"warm (median of {len(warm)})", *median))
        rows.insert(2, (f"warm server, launcher off (median of {len(no_launcher)})",
                        *(statistics.median(r[i] for r in no_launcher) for i in range(3))))
    print(f"speechpairs run, examples/quickstart.yaml on 2 clips (load average {load:.2f} at the start, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'server':<40} {'wall s':>7} {'taken s':>8} {'flow s':>7} {'wall-flow s':>12}")
    for name, wall, taken, flow in rows:
        print(f"{name:<40} {wall:7.2f} {taken:8.2f} {flow:7.2f} {wall - flow:12.2f}")
    cold, (_, warm_wall, warm_taken, warm_flow) = rows[0], rows[1]
    print(f"server start on first use (cold - warm wall): {cold[1] - warm_wall:6.2f} s")
    print(f"server restart (restart - warm wall):         {rows[3][1] - warm_wall:6.2f} s")
    print(f"launcher ready after the first run:           {ready:6.2f} s (background imports)")
    print(f"in the command, outside the flow (taken - flow): {warm_taken - warm_flow:5.2f} s")
    overhead = warm_wall - warm_flow
    print(f"warm run over the flow's own time (wall - flow): {overhead:5.2f} s   target <= {TARGET_S:.0f} s   "
          f"{'PASS' if overhead <= TARGET_S else 'MISS'}")


if __name__ == "__main__":
    main()
