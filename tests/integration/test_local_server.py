"""The shared local Prefect server (flows/local_server.py), with real `prefect server start` processes.

Every test has its own data folder (SPEECHPAIRS_HOME) and ends every server it started, by PID:
the record's, and any process whose PREFECT_HOME is the test's folder. Starts cost 20-45 s on a
busy 2-core machine, so all but the first-start test begin from a database migrated once per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import pytest

from flows.local_server import ServerRecord, probe
from tests.support.paths import REPO

SAMPLE = REPO / "examples" / "sample_corpus"
PREFECT_VERSION = metadata.version("prefect")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path, **extra: str) -> dict[str, str]:
    """No PREFECT_API_URL (unless given), our own data folder, and a client PREFECT_HOME of its own so a
    developer's Prefect profile cannot point the CLI at their server."""
    env = dict(os.environ, SPEECHPAIRS_HOME=str(home), PREFECT_HOME=str(home.parent / "client-prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def _cli(home: Path, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=_env(home, **extra),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _record(home: Path) -> ServerRecord | None:
    path = home / "prefect" / "server.json"
    return ServerRecord.model_validate_json(path.read_text()) if path.exists() else None


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # not our child: init reaps it (or a container's PID 1 leaves a zombie)


def _pids(needle: bytes, command: bytes | None = None) -> list[int]:
    """Live processes with `needle` (NAME=value) in their environment (and `command` in their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ((command is None or command in (entry / "cmdline").read_bytes())
                        and needle in (entry / "environ").read_bytes().split(b"\0") and not _gone(int(entry.name))):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _server_pids(home: Path) -> list[int]:
    """Live processes whose PREFECT_HOME is this test's server folder."""
    return _pids(f"PREFECT_HOME={home / 'prefect'}".encode())


def _launcher_pids(home: Path) -> list[int]:
    """Live warm launchers (flows/launcher/) of this test's data folder, with their monitors and runners."""
    return _pids(f"SPEECHPAIRS_HOME={home}".encode(), b"flows.launcher")


def _health(url: str) -> object:
    with urllib.request.urlopen(f"{url}/api/health", timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def local_home(tmp_path: Path) -> Iterator[Path]:
    """An isolated data folder; afterwards every server process of it is ended (by PID)."""
    home = tmp_path / "sp-home"
    yield home
    for pid in _server_pids(home) + _launcher_pids(home):
        try:
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while (_server_pids(home) or _launcher_pids(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _server_pids(home) and not _launcher_pids(home)


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Prefect database migrated once (`prefect server database upgrade`), copied into tests' folders."""
    home = tmp_path_factory.mktemp("migrated")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env, check=True,
                   capture_output=True, timeout=300)
    return home / "prefect.db"


def _seed(home: Path, db: Path) -> None:
    (home / "prefect").mkdir(parents=True)
    shutil.copy(db, home / "prefect" / "prefect.db")


_READY = re.compile(r"local Prefect server ready in \d+\.\d s at http://127\.0\.0\.1:(\d+) \(PID (\d+);")


def test_first_start_status_reuse_stop_and_a_stale_record(local_home: Path) -> None:
    # A stale record: its process exited and nothing listens on its port.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (local_home / "prefect").mkdir(parents=True)
    stale_port = _free_port()
    (local_home / "prefect" / "server.json").write_text(ServerRecord(
        url=f"http://127.0.0.1:{stale_port}", port=stale_port, pid=dead.pid, pid_start=None,
        prefect_version=PREFECT_VERSION, home=str(local_home / "prefect"), started_at=0).model_dump_json())
    status = _cli(local_home, "server", "status")
    assert status.returncode == 1 and "stale record: the server is gone" in status.stdout, status

    first = _cli(local_home, "server", "start")
    assert first.returncode == 0, first
    assert "speechpairs: starting a local Prefect server (first run: creating its database" in first.stderr
    ready = _READY.search(first.stderr)
    assert ready, first.stderr
    record = _record(local_home)
    assert record is not None and (record.port, record.pid) == (int(ready[1]), int(ready[2]))
    assert record.pid != dead.pid and record.prefect_version == PREFECT_VERSION
    assert f"PID:          {record.pid}" in first.stdout and f"prefect {PREFECT_VERSION}" in first.stdout
    assert "local Prefect server: running" in first.stdout
    assert f"data folder:  {local_home / 'prefect'}" in first.stdout
    # It outlives the command that started it, leads its own session, logs and stores in the data folder.
    assert _health(record.url) is True
    assert os.getsid(record.pid) == record.pid
    assert (local_home / "prefect" / "server.log").stat().st_size > 0
    assert (local_home / "prefect" / "prefect.db").exists()
    assert _server_pids(local_home) == [record.pid]

    again = _cli(local_home, "server", "start")
    assert again.returncode == 0 and "starting" not in again.stderr, again
    assert _record(local_home) == record and _server_pids(local_home) == [record.pid]

    status = _cli(local_home, "server", "status")
    assert status.returncode == 0, status
    assert f"URL:          {record.url} (API {record.url}/api)" in status.stdout

    stop = _cli(local_home, "server", "stop")
    assert stop.returncode == 0 and f"stopped the local Prefect server (PID {record.pid}, {record.url})" in stop.stdout
    assert _gone(record.pid) and _record(local_home) is None and not _server_pids(local_home)
    with pytest.raises(OSError):
        _health(record.url)
    status = _cli(local_home, "server", "status")
    assert status.returncode == 1 and "local Prefect server: not running" in status.stdout
    assert "no local Prefect server recorded" in _cli(local_home, "server", "stop").stdout


def _two_clip_config(tmp_path: Path) -> Path:
    lines = (SAMPLE / "manifest.jsonl").read_text().splitlines()[:2]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.jsonl").write_text(
        "".join(json.dumps({**json.loads(x), "path": str(SAMPLE / json.loads(x)["path"])}) + "\n" for x in lines))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "sources": [{"path": str(corpus / "manifest.jsonl"), "dataset": "srv", "allowed_roots": [str(SAMPLE)]}],
        "output": {"root": str(tmp_path / "out"), "dataset": "srv"}, "llm": {"backend": "template"}}))
    return config


_RUN_AND_LIST_MODULES = ("import sys\nfrom flows.cli import main\nrc = main(sys.argv[1:])\n"
                         "print('MODULES', sorted(m for m in sys.modules if m.split('.')[0] in "
                         "('torch', 'transformers', 'whisper', 'torchcodec')))\nsys.exit(rc)\n")


def _flow_runs(api: str) -> int:
    req = urllib.request.Request(f"{api}/flow_runs/count", data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.loads(resp.read()))


def test_runs_share_one_server_an_explicit_api_wins_and_torch_stays_out(
        tmp_path: Path, local_home: Path, migrated_db: Path, prefect_api: str) -> None:
    _seed(local_home, migrated_db)
    config = str(_two_clip_config(tmp_path))
    first = subprocess.run([sys.executable, "-c", _RUN_AND_LIST_MODULES, "run", config, "--no-progress"], cwd=REPO,
                           env=_env(local_home), capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first
    assert "speechpairs: starting a local Prefect server (~10-20 s)…" in first.stderr
    record = _record(local_home)
    assert record is not None and _READY.search(first.stderr)
    # No model stage configured: the run path never imports torch (or any model library).
    assert "MODULES []" in first.stdout, first.stdout
    link = re.search(r"  flow run:     (http://127\.0\.0\.1:(\d+))/runs/flow-run/([0-9a-f-]{36})", first.stdout)
    assert link and link[1] == record.url, first.stdout
    assert f"speechpairs: flow run generate-srv: {link[0].split('flow run:     ')[1]}" in first.stderr
    with urllib.request.urlopen(f"{record.api_url}/flow_runs/{link[3]}", timeout=10) as resp:
        assert json.loads(resp.read())["name"] == "generate-srv-v0001"  # on the local server

    second = _cli(local_home, "run", config, "--no-progress")
    assert second.returncode == 0 and "srv already committed as v0001" in second.stdout, second
    assert "starting" not in second.stderr and "waiting" not in second.stderr, second.stderr
    assert f"flow run:     {record.url}/runs/flow-run/" in second.stdout
    assert _record(local_home) == record and _server_pids(local_home) == [record.pid]  # no new process

    before = _flow_runs(record.api_url)
    third = _cli(local_home, "run", config, "--no-progress", PREFECT_API_URL=prefect_api)
    assert third.returncode == 0 and "starting" not in third.stderr, third
    assert f"flow run:     {prefect_api.removesuffix('/api')}/runs/flow-run/" in third.stdout
    assert _flow_runs(record.api_url) == before  # the local server saw nothing of it


def test_a_warm_launcher_runs_the_next_run_and_stops_with_the_server(
        tmp_path: Path, local_home: Path, migrated_db: Path) -> None:
    """The first run starts the launcher in the background; the next run is handed to it (its log says
    so) and prints what an in-process run prints; `server stop` ends it."""
    _seed(local_home, migrated_db)
    config = _two_clip_config(tmp_path)
    first = _cli(local_home, "run", str(config), "--no-progress", SPEECHPAIRS_LAUNCHER="on")
    assert first.returncode == 0 and "srv committed v0001" in first.stdout, first
    log = local_home / "prefect" / "launcher.log"
    deadline = time.monotonic() + 120
    while "ready in" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the launcher never became ready"
        time.sleep(0.5)
    status = _cli(local_home, "server", "status", SPEECHPAIRS_LAUNCHER="on")
    warm = re.search(r"launcher:     warm \(PID (\d+);", status.stdout)
    assert warm, status.stdout

    other = json.loads(config.read_text())
    other["output"]["root"] = str(tmp_path / "out2")
    config.write_text(json.dumps(other))
    second = _cli(local_home, "run", str(config), "--no-progress", SPEECHPAIRS_LAUNCHER="on")
    assert second.returncode == 0, second
    assert "srv committed v0001" in second.stdout and f"location:     {tmp_path / 'out2'}" in second.stdout
    assert "rows written: 2" in second.stdout and "flow run:     http://127.0.0.1:" in second.stdout
    assert re.search(rf"ran run {re.escape(str(config))} in {re.escape(str(REPO))}: exit 0", log.read_text())
    assert (tmp_path / "out2" / "srv" / "v0001" / "manifest.json").exists()

    bad = _cli(local_home, "run", str(tmp_path / "missing.yaml"), SPEECHPAIRS_LAUNCHER="on")
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr, bad  # usage errors come back as they are
    assert ": exit 2" in log.read_text()

    stop = _cli(local_home, "server", "stop", SPEECHPAIRS_LAUNCHER="on")
    assert f"stopped the warm launcher (PID {warm[1]})" in stop.stdout, stop
    deadline = time.monotonic() + 30
    while _launcher_pids(local_home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _launcher_pids(local_home)


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str]]] = []

    def _answer(self) -> None:
        self.seen.append((self.command, self.path))
        self.send_response(404)
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_a_foreign_server_on_the_recorded_port_is_never_used(local_home: Path, migrated_db: Path) -> None:
    _seed(local_home, migrated_db)
    foreign = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    port = foreign.server_address[1]
    # The recorded PID now belongs to an unrelated process (a reused PID): it must never be signalled.
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        (local_home / "prefect" / "server.json").write_text(ServerRecord(
            url=f"http://127.0.0.1:{port}", port=port, pid=bystander.pid, pid_start="1",
            prefect_version=PREFECT_VERSION, home=str(local_home / "prefect"), started_at=0).model_dump_json())
        status = _cli(local_home, "server", "status")
        assert status.returncode == 1 and "something else answers on its port" in status.stdout, status

        start = _cli(local_home, "server", "start")
        assert start.returncode == 0, start
        assert f"http://127.0.0.1:{port} (recorded in" in start.stderr and "not using it" in start.stderr
        record = _record(local_home)
        assert record is not None and record.port != port and _health(record.url) is True
        assert _Recorder.seen and set(_Recorder.seen) == {("GET", "/api/health")}  # probed, never used
        assert bystander.poll() is None  # still running
        stop = _cli(local_home, "server", "stop")
        assert stop.returncode == 0 and f"PID {record.pid}" in stop.stdout and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        foreign.shutdown()


_OLD_SERVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from tests.support.paths import REPO
home = sys.argv[1]
answers = {"/api/health": True, "/api/admin/version": "2.20.0", "/api/admin/settings": {"home": home}}
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(answers[self.path]).encode() if self.path in answers else b"null"
        self.send_response(200 if self.path in answers else 404)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = HTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_our_server_of_another_prefect_version_is_restarted(local_home: Path, migrated_db: Path) -> None:
    """After an upgrade the recorded server (our folder, older prefect) is stopped by PID and replaced."""
    _seed(local_home, migrated_db)
    server_dir = local_home / "prefect"
    old = subprocess.Popen([sys.executable, "-c", _OLD_SERVER, str(server_dir)], stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        assert old.stdout is not None
        port = int(old.stdout.readline())
        pid_start = Path(f"/proc/{old.pid}/stat").read_text().rpartition(")")[2].split()[19]
        (server_dir / "server.json").write_text(ServerRecord(
            url=f"http://127.0.0.1:{port}", port=port, pid=old.pid, pid_start=pid_start, prefect_version="2.20.0",
            home=str(server_dir), started_at=0).model_dump_json())
        assert probe(f"http://127.0.0.1:{port}", server_dir) == "other_version"
        start = _cli(local_home, "server", "start")
        assert start.returncode == 0, start
        assert (f"the local Prefect server at http://127.0.0.1:{port} runs prefect 2.20.0, installed is "
                f"{PREFECT_VERSION}: restarting it") in start.stderr
        assert old.wait(timeout=5) == -signal.SIGTERM  # ended by its recorded PID (process group)
        record = _record(local_home)
        assert record is not None and record.port != port and record.prefect_version == PREFECT_VERSION
        assert _health(record.url) is True and _server_pids(local_home) == [record.pid]
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()


def test_two_first_uses_at_once_start_one_server(local_home: Path, migrated_db: Path) -> None:
    _seed(local_home, migrated_db)
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "start"], cwd=REPO,
                              env=_env(local_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    record = _record(local_home)
    assert record is not None
    assert sorted("starting a local Prefect server" in err for _, err in results) == [False, True], results
    assert any("waiting for another speechpairs command" in err for _, err in results), results
    assert all(f"PID:          {record.pid}" in out for out, _ in results)
    assert _server_pids(local_home) == [record.pid]


def test_probe_tells_our_server_from_another_prefect_server(prefect_api: str, tmp_path: Path) -> None:
    """The session harness is a real Prefect server with another PREFECT_HOME: foreign to us."""
    url = prefect_api.removesuffix("/api")
    with urllib.request.urlopen(f"{prefect_api}/admin/settings", timeout=10) as resp:
        harness_home = Path(json.loads(resp.read())["home"])
    assert probe(url, harness_home) == "ours"  # the same checks pass for the server's own folder
    assert probe(url, tmp_path) == "foreign"
    assert probe(f"http://127.0.0.1:{_free_port()}", tmp_path) == "down"
