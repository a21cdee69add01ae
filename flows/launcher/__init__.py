"""A warm launcher next to the local Prefect server, so a second `speechpairs run` starts in a second.

A run spends ~4 s importing Prefect, pyarrow and the pipeline before its first clip, every time.
The launcher is one background process per data folder that has done those imports once; a
`speechpairs run` (the client) hands it its argv, working directory, environment and terminal (the
file descriptors 0-2, passed over a Unix socket), and the launcher forks a runner that executes the
command exactly as the client process would have: same output on the same terminal, same exit code.
Ctrl-C and SIGTERM on the client are forwarded to the runner; a client that dies stops its runner.

The launcher is used only when it can behave like an in-process run; otherwise the client runs the
command itself, as before:
- the code and the environment it imported are the client's (a fingerprint of the interpreter,
  site-packages and the speechpairs sources; a launcher with other code exits, and the in-process run
  starts a fresh one), and the Prefect/telemetry variables read at import time are the same;
- the peer is the same user (SO_PEERCRED); the socket is 0600 in a 0700 folder;
- `SPEECHPAIRS_LAUNCHER=off` disables it (no launcher started, none used).
It is started in the background by the first command that uses the local server (flows/local_server.py),
held alive by `launcher.lock` (flock: one per data folder), and stopped by `speechpairs server stop`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.launcher import wire

ENV_SWITCH = "SPEECHPAIRS_LAUNCHER"
COMMANDS = frozenset({"run"})  # what a launcher may run for a client (the commands that start flows)
ENTRY = "flows.cli:main"
_SOURCES = ("flows", "tasks", "schemas", "storage")
_REPO = Path(__file__).resolve().parent.parent.parent
MAX_RUNS = 8  # concurrent runs one launcher serves; more run in their own processes
# Prefect and our CLI read these when Prefect is imported; a launcher serves only clients that agree.
_IMPORT_TIME_PREFIXES = ("PREFECT_", "DO_NOT_TRACK")
_RUNTIME_ONLY = frozenset({"PREFECT_API_URL"})  # re-read per run (refresh_global_settings_context)


_in_runner = False  # set in a runner (serve.py): the command it runs must not delegate again


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").lower() not in {"off", "0", "false", "no"}


# --- where: the socket and the lock ---------------------------------------------------------------


def _folder() -> Path:
    from flows.local_server import server_dir

    return server_dir()


def socket_path(folder: Path | None = None) -> Path:
    """`launcher.sock` in the data folder, or, where that path is too long for a Unix socket (108
    bytes), one in a private per-user folder under /tmp named by a hash of the data folder."""
    folder = folder or _folder()
    path = folder / "launcher.sock"
    if len(os.fsencode(path)) < 100:
        return path
    digest = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:20]
    private = Path("/tmp") / f"speechpairs-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    info = private.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not private.is_dir() or private.is_symlink():
        raise OSError(f"{private} is not a private folder of this user; remove it or set {ENV_SWITCH}=off")
    return private / f"{digest}.sock"


def _lock_path(folder: Path) -> Path:
    return folder / "launcher.lock"


def log_path(folder: Path | None = None) -> Path:
    return (folder or _folder()) / "launcher.log"


def running(folder: Path | None = None) -> bool:
    """A launcher holds this data folder's lock (it may still be importing: not yet accepting)."""
    folder = folder or _folder()
    try:
        fd = os.open(_lock_path(folder), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def fingerprint() -> str:
    """The code a process would run: interpreter, the site-packages folders (their mtimes change when
    pip adds or removes a package) and every speechpairs source file (mtime and size). ~ms to compute."""
    parts: list[str] = [os.path.realpath(sys.executable), sys.version]
    for entry in sys.path:
        if entry.endswith("site-packages") and os.path.isdir(entry):
            parts.append(f"{entry}:{os.stat(entry).st_mtime_ns}")
    for name in _SOURCES:
        for path in sorted(_py_files(_REPO / name)):
            info = os.stat(path)
            parts.append(f"{path}:{info.st_mtime_ns}:{info.st_size}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _py_files(folder: Path) -> Iterator[str]:
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
            yield from _py_files(Path(entry.path))
        elif entry.name.endswith(".py"):
            yield entry.path


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME_PREFIXES) and k not in _RUNTIME_ONLY}


def _prepare_environment() -> None:
    """The settings the CLI sets before Prefect loads; clients are compared against them."""
    from flows.cli import prepare_environment
    from flows.cli.base import quiet_prefect

    prepare_environment()
    quiet_prefect()


# --- the client ------------------------------------------------------------------------------------


def delegate(argv: list[str]) -> int | None:
    """Run `speechpairs argv` in the warm launcher and return its exit code, or None when this process
    should run the command itself (no launcher, another code/environment, disabled)."""
    if _in_runner or not argv or argv[0] not in COMMANDS or not enabled():
        return None
    _prepare_environment()  # what the command sets before importing Prefect: part of the compared settings
    try:
        path = socket_path()
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        return None
    with sock:
        env = dict(os.environ)
        try:
            wire.send(sock, {"kind": "run", "argv": argv, "cwd": os.getcwd(), "env": env,
                         "fingerprint": fingerprint(), "import_env": import_time_env(env)}, [0, 1, 2])
            reply = wire.recv(sock)
        except OSError:
            return None
        if not reply or not reply.get("accepted"):
            return None
        return _wait(sock)


def _wait(sock: socket.socket) -> int:
    """Forward Ctrl-C/SIGTERM/SIGHUP to the runner until it reports its exit status."""
    def forward(signum: int, _frame: object) -> None:
        try:
            wire.send(sock, {"kind": "signal", "signal": signum})
        except OSError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                message = wire.recv(sock)
            except InterruptedError:
                continue
            except OSError:
                message = None
            if message is None:
                print("speechpairs: the launcher's runner ended without an exit status "
                      f"(see {log_path()})", file=sys.stderr)
                return 1
            if message.get("kind") == "exit":
                return int(message["code"])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def request(kind: str, folder: Path | None = None, timeout: float = 5.0) -> dict[str, Any] | None:
    """A `status` or `quit` request to the launcher (None when none answers)."""
    try:
        path = socket_path(folder)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            wire.send(sock, {"kind": kind})
            return wire.recv(sock)
    except (OSError, ValueError):
        return None


def stop(folder: Path | None = None, timeout: float = 10.0) -> int | None:
    """Ask the launcher to exit and wait until its lock is free; its PID, or None if none ran."""
    reply = request("quit", folder)
    deadline = time.monotonic() + timeout
    while running(folder) and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(reply["pid"]) if reply and "pid" in reply else None


def ensure_started() -> None:
    """Start a launcher in the background for this data folder unless one runs (or it is disabled).
    Returns at once: the launcher imports for a few seconds before it accepts clients."""
    if not enabled():
        return
    folder = _folder()
    if running(folder):
        return
    import subprocess

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log_path(folder), "ab") as log:  # also catches what the launcher's imports print
        subprocess.Popen([sys.executable, "-m", "flows.launcher"], cwd=_REPO, stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True, close_fds=True)
