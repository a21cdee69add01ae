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

import array
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ENV_SWITCH = "SPEECHPAIRS_LAUNCHER"
COMMANDS = frozenset({"run"})  # what a launcher may run for a client (the commands that start flows)
ENTRY = "flows.cli:main"
_SOURCES = ("flows", "tasks", "schemas", "storage")
_REPO = Path(__file__).resolve().parent.parent
_MAX_MESSAGE = 1 << 20
MAX_RUNS = 8  # concurrent runs one launcher serves; more run in their own processes
# Prefect and our CLI read these when Prefect is imported; a launcher serves only clients that agree.
_IMPORT_TIME_PREFIXES = ("PREFECT_", "DO_NOT_TRACK")
_RUNTIME_ONLY = frozenset({"PREFECT_API_URL"})  # re-read per run (refresh_global_settings_context)


_in_runner = False  # set in a runner: the command it runs must not delegate again


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


# --- framing: 4-byte length + JSON ----------------------------------------------------------------


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(message).encode()
    data = struct.pack("!I", len(body)) + body
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        data, ancdata, _flags, _addr = sock.recvmsg(n - got, socket.CMSG_SPACE(3 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not data:
            return None
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _recv(sock: socket.socket, fds: list[int] | None = None) -> dict[str, Any] | None:
    """One message (None at EOF); file descriptors that came with it are appended to `fds`."""
    received: list[int] = []
    header = _recv_exact(sock, 4, received)
    body = None
    if header is not None:
        (length,) = struct.unpack("!I", header)
        body = _recv_exact(sock, length, received) if length <= _MAX_MESSAGE else None
    if fds is None:
        for fd in received:
            os.close(fd)
    else:
        fds.extend(received)
    if body is None:
        return None
    message = json.loads(body)
    return message if isinstance(message, dict) else None


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
            _send(sock, {"kind": "run", "argv": argv, "cwd": os.getcwd(), "env": env,
                         "fingerprint": fingerprint(), "import_env": import_time_env(env)}, [0, 1, 2])
            reply = _recv(sock)
        except OSError:
            return None
        if not reply or not reply.get("accepted"):
            return None
        return _wait(sock)


def _wait(sock: socket.socket) -> int:
    """Forward Ctrl-C/SIGTERM/SIGHUP to the runner until it reports its exit status."""
    def forward(signum: int, _frame: object) -> None:
        try:
            _send(sock, {"kind": "signal", "signal": signum})
        except OSError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                message = _recv(sock)
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
            _send(sock, {"kind": kind})
            return _recv(sock)
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


# --- the launcher -----------------------------------------------------------------------------------


_log_file: Path | None = None  # set by serve()


def _log(message: str) -> None:
    """One line in launcher.log (opened per line: monitors and the launcher append to it concurrently)."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}\n"
    if _log_file is None:
        sys.stderr.write(line)
        return
    with open(_log_file, "a", encoding="utf-8") as out:
        out.write(line)


def _prepare_environment() -> None:
    """The settings the CLI sets before Prefect loads; clients are compared against them."""
    from flows.cli import prepare_environment
    from flows.cli.base import quiet_prefect

    prepare_environment()
    quiet_prefect()


def _preload() -> None:
    """What `speechpairs run` imports, done once."""
    import gc
    import importlib

    for name in ("flows.cli", "flows.cli.run", "flows.generate", "flows.progress", "flows.local_server",
                 "storage.lease", "storage.preflight", "tasks.commit_gate", "tasks.stopping", "tasks.plan",
                 "tasks.llm", "tasks.features", "tasks.features.models", "tasks.instructions", "prefect.context",
                 "tqdm", "scipy.signal", "scipy.fft", "scipy.special"):
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # imported objects stay shared with the runners (no copy-on-write from the collector)


def serve(entry: str = ENTRY, folder: Path | None = None, preload: Callable[[], None] = _preload) -> int:
    """The launcher's main loop: take the lock (else another launcher runs: exit 0), import, accept."""
    global _log_file
    folder = folder or _folder()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _log_file = log_path(folder)
    lock = os.open(_lock_path(folder), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0
    code = fingerprint()
    started = time.monotonic()
    sys.path[:] = [os.path.abspath(p) for p in sys.path]  # runners chdir: later imports resolve as here
    _prepare_environment()
    preload()
    _entry(entry)  # imported now, not in every runner
    path = socket_path(folder)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    launcher = os.getpid()
    stopping = False

    def quit_(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        listener.close()  # wakes accept()

    signal.signal(signal.SIGTERM, quit_)
    listener.settimeout(1.0)  # to reap finished monitors while idle
    monitors: set[int] = set()
    _log(f"ready in {time.monotonic() - started:.1f} s: {path} (entry {entry})")
    try:
        while not stopping:
            _reap(monitors)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if stopping or exc.errno == errno.EBADF:
                    break
                if exc.errno == errno.EINTR:
                    continue
                raise
            if len(monitors) >= MAX_RUNS:  # the client sees EOF and runs the command itself
                conn.close()
                _log(f"declined: {MAX_RUNS} runs already in progress")
                continue
            conn.settimeout(None)
            monitor = os.fork()
            if monitor == 0:  # the monitor: owns this connection
                listener.close()
                try:
                    _monitor(conn, entry, code, launcher)
                finally:
                    os._exit(0)
            monitors.add(monitor)
            conn.close()
    finally:
        path.unlink(missing_ok=True)  # ours: no other launcher binds while this one holds the lock
        _log("stopped")
    return 0


def _entry(entry: str) -> Callable[[list[str]], int]:
    import importlib

    module, _, name = entry.partition(":")
    function: Callable[[list[str]], int] = getattr(importlib.import_module(module), name)
    return function


def _reap(children: set[int]) -> None:
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


def _peer(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the connecting process."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def _descends_from(pid: int, ancestor: int) -> bool:
    """`pid` is `ancestor` or below it (a runner's own command must never come back to the launcher)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _monitor(conn: socket.socket, entry: str, code: str, launcher: int) -> None:
    """One client: check it, fork the runner, forward signals to it, report its exit status."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    peer_pid, peer_uid = _peer(conn)
    if peer_uid != os.getuid():
        return
    fds: list[int] = []
    request_ = _recv(conn, fds)
    if request_ is None:
        return
    kind = request_.get("kind")
    if kind in {"status", "quit"}:
        _send(conn, {"kind": kind, "pid": launcher, "fingerprint": code})
        if kind == "quit":
            os.kill(launcher, signal.SIGTERM)
        return
    why = None
    if kind != "run" or request_.get("argv", [None])[0] not in COMMANDS or len(fds) != 3:
        why = "not a run request"
    elif _descends_from(peer_pid, launcher):
        why = "nested: a command started by a runner"
    elif request_.get("fingerprint") != code:
        why = "other code"
    elif request_.get("import_env") != import_time_env(dict(os.environ)):
        why = "other Prefect settings"
    if why:
        _send(conn, {"accepted": False, "why": why})
        _log(f"declined ({why})")
        if why == "other code":
            os.kill(launcher, signal.SIGTERM)  # stale: the client's in-process run starts a fresh one
        return
    _send(conn, {"accepted": True})
    started = time.monotonic()
    runner = os.fork()
    if runner == 0:
        conn.close()
        _run(entry, request_, fds)  # never returns
    for fd in fds:
        os.close(fd)
    status = _supervise(conn, runner)
    exit_code = os.waitstatus_to_exitcode(status)
    exit_code = 128 - exit_code if exit_code < 0 else exit_code
    try:
        _send(conn, {"kind": "exit", "code": exit_code})
    except OSError:
        pass
    _log(f"ran {' '.join(request_['argv'][:2])} in {request_['cwd']}: exit {exit_code} "
         f"({time.monotonic() - started:.1f} s, runner {runner})")


def _supervise(conn: socket.socket, runner: int) -> int:
    """Forward the client's signals to the runner; a client gone (EOF) stops it (SIGTERM). The wait status."""
    import select

    while True:
        pid, status = os.waitpid(runner, os.WNOHANG)
        if pid == runner:
            return status
        ready, _, _ = select.select([conn], [], [], 0.2)
        if not ready:
            continue
        try:
            message = _recv(conn)
        except OSError:
            message = None
        if message is None:
            os.kill(runner, signal.SIGTERM)
            _, status = os.waitpid(runner, 0)
            return status
        if message.get("kind") == "signal":
            signum = int(message["signal"])
            if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                os.kill(runner, signum)


def _run(entry: str, request_: dict[str, Any], fds: list[int]) -> None:
    """In the runner: become the client process (terminal, cwd, environment, argv), run, exit."""
    import atexit
    import io
    import threading
    import traceback

    global _in_runner
    _in_runner = True
    code = 1
    try:
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        os.chdir(request_["cwd"])
        os.environ.clear()
        os.environ.update(request_["env"])
        sys.argv = ["speechpairs", *request_["argv"]]
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1))
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                      errors="backslashreplace")
        if "prefect.context" in sys.modules:
            sys.modules["prefect.context"].refresh_global_settings_context()
        code = int(_entry(entry)(list(request_["argv"])) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed for the user, as the interpreter would
        traceback.print_exc()
        code = 1
    finally:
        try:
            for thread in threading.enumerate():
                if thread is not threading.main_thread() and not thread.daemon:
                    thread.join()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    import importlib

    # Run as the module `flows.launcher`, not as __main__: the runner's `_in_runner` flag must be the
    # one flows.cli sees.
    sys.exit(importlib.import_module("flows.launcher").serve())
