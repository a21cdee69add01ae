"""`make serve` (flows/serve.py): refuses a taken port at once, and really starts, deploys and stops a
Prefect server + worker, leaving no process behind."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.deploy import DEFAULT_POOL, deployment_names
from tests.support.paths import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    return env


def _serve(port: int, home: Path, timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.serve", "--host", "127.0.0.1", "--port", str(port)],
                          cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=timeout, check=False)
    return proc, time.monotonic() - started


class _NotPrefect(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>hello</html>" if self.path == "/" else b"not here"
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotPrefect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_a_port_where_another_http_server_answers(other_http_server: int, tmp_path: Path) -> None:
    proc, seconds = _serve(other_http_server, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert seconds < 15
    err = proc.stderr
    assert f"port {other_http_server} on 127.0.0.1 is taken by something that is not a Prefect server" in err
    assert "/api/health with 404" in err and f"make serve PORT={other_http_server + 1}" in err
    assert "Prefect server on" not in proc.stdout  # nothing was started
    assert not (tmp_path / "serve-server.log").exists() and not (tmp_path / "prefect.db").exists()


def test_serve_refuses_a_port_held_by_a_program_that_is_not_http(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # never accepts or answers
        port = int(listener.getsockname()[1])
        proc, seconds = _serve(port, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert seconds < 15
    assert f"port {port} on 127.0.0.1 is taken by something that is not a Prefect server" in proc.stderr
    assert "no Prefect API answers" in proc.stderr
    assert not (tmp_path / "serve-server.log").exists()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            found.add(kid)
            todo.append(kid)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process tree from /proc (Linux)")
def test_serve_starts_deploys_and_stops_with_nothing_left(tmp_path: Path) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--port", str(port)], cwd=REPO,
                                env=_env(tmp_path), stdout=out, stderr=err, text=True, start_new_session=True)
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while "serving." not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text() + err_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text() + err_path.read_text()
            time.sleep(0.5)
        with SyncPrefectClient(api) as client:
            assert client.read_work_pool(DEFAULT_POOL).type == "process"
            names = {d.name for d in client.read_deployments()}
            assert names == set(deployment_names())
            deadline = time.monotonic() + 60
            while not client.read_workers_for_work_pool(DEFAULT_POOL):
                assert time.monotonic() < deadline, "the worker never reported to the server"
                time.sleep(1)
        tree = _descendants(proc.pid)
        groups = {g for g in map(_pgid, tree) if g is not None}
        assert len(tree) >= 2 and len(groups) >= 2, tree  # server and worker, each in a group of its own

        # A second `make serve` on the same port is refused: it names the Prefect server there.
        second, seconds = _serve(port, tmp_path / "second")
        assert second.returncode == 1 and seconds < 15
        assert f"a Prefect server already answers at {api}" in second.stderr

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 128 + signal.SIGTERM
        assert "SIGTERM received: stopping the worker and the server" in err_path.read_text()
        assert "stopped" in err_path.read_text()
        left = sorted(pid for pid in tree if _running(pid))
        assert not left, f"processes left behind: {left}"
        in_groups = [p for p in Path("/proc").glob("[0-9]*") if _pgid(int(p.name)) in groups and _running(int(p.name))]
        assert not in_groups, in_groups
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for pid in [proc.pid, *tree]:
            if _running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=30)
