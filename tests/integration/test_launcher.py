"""The warm launcher (flows/launcher/) with real processes, a real Unix socket and passed descriptors.

The launcher runs a stand-in command (tests/support/launcher_entry.py) so each case takes a second:
what the client sees (output on its own descriptors, exit status, working directory, environment),
signals forwarded, a client that dies stopping its runner, and the cases where the client must run
the command itself (another environment, other code, a command started by a runner, switched off).
The real `speechpairs run` through a launcher is tested in test_local_server.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.launcher import running, socket_path
from tests.support.launcher_entry import CLIENT
from tests.support.paths import REPO

ENTRY = "tests.support.launcher_entry:main"
SERVE = "import sys\nfrom flows.launcher.serve import serve\nsys.exit(serve(entry=sys.argv[1], preload=lambda: None))\n"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, SPEECHPAIRS_HOME=str(home), SPEECHPAIRS_LAUNCHER="on", PYTHONUNBUFFERED="1")
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def _status(home: Path, cwd: Path = REPO) -> str:
    return subprocess.run([sys.executable, "-c", "from flows import launcher; print(launcher.request('status'))"],
                          cwd=cwd, env=_env(home), capture_output=True, text=True, timeout=30, check=True).stdout


class Launcher:
    def __init__(self, home: Path, cwd: Path) -> None:
        self.home, self.cwd = home, cwd
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, ENTRY], cwd=cwd, env=_env(home),
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "'pid'" not in _status(home, cwd):
            assert self.proc.poll() is None, "the launcher exited"
            assert time.monotonic() < deadline, "the launcher did not start accepting"
            time.sleep(0.2)

    @property
    def log(self) -> str:
        path = self.home / "prefect" / "launcher.log"
        return path.read_text() if path.exists() else ""

    def client(self, *args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", CLIENT, "run", *args], cwd=cwd or self.cwd,
                                env=_env(self.home, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher's session: it and any runner left
            self.proc.wait(timeout=30)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    started = Launcher(tmp_path / "home", REPO)
    yield started
    started.stop()


def test_the_runner_uses_the_clients_descriptors_directory_environment_and_exit_status(
        launcher: Launcher, tmp_path: Path) -> None:
    proc = launcher.client("echo", "7", cwd=tmp_path, SP_TEST_VAR="from-the-client")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, (out, err)
    assert "ARGV ['run', 'echo', '7']" in out
    assert f"CWD {tmp_path}" in out
    assert "VAR from-the-client" in out
    assert "ERR line" in err
    assert "DELEGATED 7" in out  # the client's own line: the code came back through the launcher
    assert "ran run echo" in launcher.log and ": exit 7" in launcher.log


def test_ctrl_c_on_the_client_reaches_the_runner(launcher: Launcher, tmp_path: Path) -> None:
    proc = launcher.client("sleep", str(tmp_path / "marker"))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "SLEEPING"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in out


def test_a_client_that_dies_stops_its_runner(launcher: Launcher, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = launcher.client("sleep", str(marker))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "SLEEPING"
    runner = int(Path(f"{marker}.pid").read_text())
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.read_text() == "term"  # the runner got SIGTERM from its monitor, not left running
    assert runner != proc.pid


def test_a_command_started_by_a_runner_is_not_taken_back(launcher: Launcher) -> None:
    proc = launcher.client("nested")
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, (out, err)
    assert "INNER FALLBACK" in out  # the inner client ran it itself: no runner waits on a runner
    assert "declined (nested" in launcher.log


def test_other_prefect_settings_or_switched_off_run_in_the_client(launcher: Launcher) -> None:
    other = launcher.client("echo", "0", PREFECT_LOGGING_LEVEL="DEBUG")
    out, _ = other.communicate(timeout=60)
    assert "FALLBACK" in out and "ARGV" not in out
    assert "declined (other Prefect settings)" in launcher.log
    assert "'pid'" in _status(launcher.home)  # still serving clients that match it

    off = launcher.client("echo", "0", SPEECHPAIRS_LAUNCHER="off")
    out, _ = off.communicate(timeout=60)
    assert "FALLBACK" in out
    assert launcher.log.count("declined") == 1  # never asked


def test_a_launcher_with_other_code_declines_and_exits(tmp_path: Path) -> None:
    copy = tmp_path / "code"
    for name in ("flows", "tasks", "schemas", "storage", "tests"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    started = Launcher(tmp_path / "home", copy)
    try:
        changed = copy / "tasks" / "describe.py"
        changed.write_text(changed.read_text() + "\n# edited after the launcher imported it\n")
        proc = started.client("echo", "0")
        out, _ = proc.communicate(timeout=60)
        assert "FALLBACK" in out and "ARGV" not in out
        assert started.proc.wait(timeout=30) == 0  # it left: the next in-process run starts a fresh one
        assert "declined (other code)" in started.log and "stopped" in started.log
        assert not socket_path(tmp_path / "home" / "prefect").exists()
    finally:
        started.stop()


def test_a_run_in_progress_does_not_hold_the_launchers_place(launcher: Launcher, tmp_path: Path) -> None:
    """The launcher dies mid-run: its lock is free at once (a successor may start) while the run goes on."""
    proc = launcher.client("sleep", str(tmp_path / "marker"))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "SLEEPING"
    os.kill(launcher.proc.pid, signal.SIGKILL)  # the launcher alone, not its session
    launcher.proc.wait(timeout=30)
    folder = launcher.home / "prefect"
    assert not running(folder)
    assert proc.poll() is None  # the run still goes on
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in out
