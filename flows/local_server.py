"""One local Prefect server per user, shared by every `speechpairs` command that needs an API.

Without PREFECT_API_URL, Prefect would start a temporary server for each run (tens of seconds before
the first clip, its history gone afterwards; docs/decisions.md). Instead the first command starts `prefect server start`
in the background (its own session, so it outlives the command; SQLite and its log in the data
folder) and records where it listens; later commands check that record and reuse the server.

Data folder: `$SPEECHPAIRS_HOME/prefect`, else `$XDG_DATA_HOME/speechpairs/prefect`, else
`~/.local/share/speechpairs/prefect`. It holds `server.json` (URL, port, PID, version), `server.lock`
(one start at a time), `server.log` and `prefect.db`.

A recorded server is used only if it answers as *this* server: `/api/health` is true, the
server's PREFECT_HOME (from `/api/admin/settings`) is our data folder, and `/api/admin/version` is
the installed prefect version. Anything else on the port is foreign and never talked to again: a new
server starts on a new free port. A process is only ever signalled after its PID and start time match
the record (a reused PID is someone else's).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

HOME_ENV = "SPEECHPAIRS_HOME"
START_TIMEOUT_S = 180.0  # a first start (database creation) on a busy machine: docs/decisions.md
STOP_TIMEOUT_S = 15.0

Say = Callable[[str], None]
Probe = Literal["ours", "other_version", "foreign", "down"]


class ServerError(RuntimeError):
    """The local server could not be started, reached or stopped; the message says what to do."""


class ServerRecord(BaseModel):
    """`server.json`: what a later command needs to find, trust and stop the server."""

    url: str  # http://127.0.0.1:PORT (the UI; the API is under /api)
    port: int
    pid: int
    pid_start: str | None  # the process's start time (/proc), so a reused PID is never signalled
    prefect_version: str
    home: str
    started_at: float  # epoch seconds

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def data_home() -> Path:
    """speechpairs' per-user data folder (SPEECHPAIRS_HOME isolates it, e.g. per test)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "speechpairs"


def server_dir() -> Path:
    return data_home() / "prefect"


def _record_path() -> Path:
    return server_dir() / "server.json"


def log_path() -> Path:
    return server_dir() / "server.log"


def installed_prefect_version() -> str:
    return metadata.version("prefect")


# --- processes --------------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    """The recorded process still runs (not a zombie, and not a newer process with the same PID)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but another user's: not ours
        return False
    try:
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
    except OSError:
        pass
    current = _proc_start(pid)
    return start is None or current is None or current == start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- HTTP ---------------------------------------------------------------------------------------

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # only ever 127.0.0.1


def _get_json(url: str, timeout: float) -> object:
    with _NO_PROXY.open(url, timeout=timeout) as resp:
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}")
        return json.loads(resp.read(1 << 20))


def probe(url: str, home: Path, timeout: float = 3.0) -> Probe:
    """What answers at `url`: our server of the installed version, ours of another version, something
    else (another Prefect server, another program), or nothing."""
    try:
        healthy = _get_json(f"{url}/api/health", timeout)
    except (OSError, ValueError):  # refused, timed out, HTTP error, not JSON
        return "down" if not _port_open(url) else "foreign"
    if healthy is not True:
        return "foreign"
    try:
        settings = _get_json(f"{url}/api/admin/settings", timeout)
        version = _get_json(f"{url}/api/admin/version", timeout)
    except (OSError, ValueError):
        return "foreign"
    served = settings.get("home") if isinstance(settings, dict) else None
    if not isinstance(served, str) or Path(served).resolve() != home.resolve():
        return "foreign"
    return "ours" if version == installed_prefect_version() else "other_version"


def _port_open(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --- the record and the lock ------------------------------------------------------------------


def read_record() -> ServerRecord | None:
    try:
        return ServerRecord.model_validate_json(_record_path().read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError):
        return None  # unreadable or from an older layout: treated like no server


def _write_record(record: ServerRecord) -> None:
    tmp = _record_path().with_suffix(".tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    os.replace(tmp, _record_path())


def _forget() -> None:
    _record_path().unlink(missing_ok=True)


@contextmanager
def _locked(say: Say) -> Iterator[None]:
    """Only one command starts or stops the server at a time; the others wait, then reuse it."""
    folder = server_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("waiting for another speechpairs command that is starting or stopping the local Prefect server…")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- start, find, stop ------------------------------------------------------------------------


def _server_env(home: Path) -> dict[str, str]:
    """The server takes its settings from us only: its own PREFECT_HOME and SQLite file, no analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    return env


# Started through a short-lived launcher so the server is not our child: it lives on in its own
# session after the command ends, and no zombie or "still running" warning is left behind.
_LAUNCHER = ("import subprocess, sys\n"
             "log = open(sys.argv[1], 'ab')\n"
             "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,"
             " start_new_session=True, close_fds=True)\n"
             "print(p.pid)\n")


def _spawn(home: Path, port: int) -> int:
    import subprocess

    cmd = [sys.executable, "-c", _LAUNCHER, str(log_path()), sys.executable, "-m", "prefect", "server", "start",
           "--host", "127.0.0.1", "--port", str(port), "--analytics-off"]
    out = subprocess.run(cmd, env=_server_env(home), cwd=home, capture_output=True, text=True, timeout=60,
                         check=False)
    if out.returncode != 0 or not out.stdout.strip().isdigit():
        raise ServerError(f"could not launch `prefect server start`: {out.stderr.strip() or out.stdout.strip()}")
    return int(out.stdout.strip())


def _log_tail(lines: int = 15) -> str:
    try:
        return "\n".join(log_path().read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _start(say: Say, timeout: float) -> ServerRecord:
    home = server_dir()
    first = not (home / "prefect.db").exists()
    say("starting a local Prefect server " + ("(first run: creating its database, ~30-60 s)…" if first
                                              else "(~10-20 s)…"))
    started = time.monotonic()
    for attempt in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        pid = _spawn(home, port)
        record = ServerRecord(url=url, port=port, pid=pid, pid_start=_proc_start(pid),
                              prefect_version=installed_prefect_version(), home=str(home), started_at=time.time())
        _write_record(record)  # written at once: `server stop` can end a start that hangs
        while time.monotonic() - started < timeout:
            if probe(url, home, timeout=2.0) == "ours":
                say(f"local Prefect server ready in {time.monotonic() - started:.1f} s at {url} "
                    f"(PID {pid}; `speechpairs server stop` ends it)")
                return record
            if not _alive(pid, record.pid_start):
                break  # it exited: e.g. another program took the port between our pick and its bind
            time.sleep(0.25)
        else:
            _terminate(record)
            _forget()
            raise ServerError(f"the local Prefect server did not answer within {timeout:.0f} s; its log "
                              f"{log_path()} ends with:\n{_log_tail()}")
        _terminate(record)
        _forget()
        if "already in use" not in _log_tail(5) or attempt == 2:
            raise ServerError(f"the local Prefect server exited while starting; its log {log_path()} "
                              f"ends with:\n{_log_tail()}")
    raise AssertionError("unreachable")


def _terminate(record: ServerRecord) -> bool:
    """End the server's process group (it leads its own session). False if it was already gone."""
    if not _alive(record.pid, record.pid_start):
        return False
    try:
        leads_group = os.getpgid(record.pid) == record.pid
    except ProcessLookupError:
        return False
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            if leads_group:
                os.killpg(record.pid, sig)
            else:
                os.kill(record.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(record.pid, record.pid_start):
                return True
            time.sleep(0.1)
    return True


def ensure_server(say: Say, timeout: float = START_TIMEOUT_S) -> ServerRecord:
    """The running local server, started first if there is none (or only a stale or foreign one)."""
    home = server_dir()
    with _locked(say):
        record = read_record()
        if record is not None:
            state = probe(record.url, home)
            if state == "ours":
                return record
            if state == "foreign":
                say(f"{record.url} (recorded in {_record_path()}) is not the local Prefect server any more; "
                    "not using it")
            elif state == "other_version":
                say(f"the local Prefect server at {record.url} runs prefect {record.prefect_version}, "
                    f"installed is {installed_prefect_version()}: restarting it")
                if not _terminate(record):
                    raise ServerError(f"a Prefect server of another version serves {home} at {record.url} "
                                      "and is not the recorded process: stop it, then run the command again")
            elif _alive(record.pid, record.pid_start):  # ours, but not answering: end it before a new one
                say(f"the local Prefect server (PID {record.pid}) does not answer: restarting it")
                _terminate(record)
            _forget()
        return _start(say, timeout)


def server_status() -> tuple[ServerRecord | None, str]:
    """(the record, a word for its state): running, other version, foreign, not answering, stopped."""
    record = read_record()
    if record is None:
        return None, "not running"
    state = probe(record.url, server_dir())
    if state == "ours":
        return record, "running"
    if state == "other_version":
        return record, "running another prefect version (the next run restarts it)"
    if state == "foreign":
        return record, "stale record: something else answers on its port (the next run starts a new server)"
    if _alive(record.pid, record.pid_start):
        return record, "process alive but not answering"
    return record, "stale record: the server is gone (the next run starts a new one)"


def stop_server(say: Say) -> ServerRecord | None:
    """Stop the server this data folder recorded (by PID, after checking it is that process)."""
    with _locked(say):
        record = read_record()
        if record is None:
            return None
        _terminate(record)
        _forget()
        return record


# --- which API a command talks to ---------------------------------------------------------------


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it (environment, profile, a test harness), or None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def use_prefect_api(say: Say) -> str:
    """The API URL this process talks to: an explicit PREFECT_API_URL always wins; otherwise the
    local server (started if needed), made Prefect's setting for the rest of the process."""
    explicit = configured_api_url()
    if explicit:
        return explicit
    record = ensure_server(say)
    from flows import launcher

    launcher.ensure_started()  # the next run on this server starts warm (flows/launcher/)
    os.environ["PREFECT_API_URL"] = record.api_url
    import prefect.context

    prefect.context.refresh_global_settings_context()  # Prefect read its settings when imported
    return record.api_url


def flow_run_url(flow_run_id: object) -> str | None:
    """The UI page of a flow run on the server in use (None when Prefect knows no UI URL)."""
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{str(ui).rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None
