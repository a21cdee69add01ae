"""The launcher process: import once, accept clients, fork a monitor per client and a runner per run.

Started as `python -m flows.launcher` (flows/launcher/__main__.py) by `flows.launcher.ensure_started`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flows.launcher as launcher_api
from flows.launcher import (
    COMMANDS,
    ENTRY,
    MAX_RUNS,
    _folder,
    _lock_path,
    _prepare_environment,
    fingerprint,
    import_time_env,
    log_path,
    socket_path,
    wire,
)

_log_file: Path | None = None  # set by serve()


def _log(message: str) -> None:
    """One line in launcher.log (opened per line: monitors and the launcher append to it concurrently)."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}\n"
    if _log_file is None:
        sys.stderr.write(line)
        return
    with open(_log_file, "a", encoding="utf-8") as out:
        out.write(line)


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
                os.close(lock)  # the lock means "a launcher lives", not "a run does": a successor may start
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
    request_ = wire.recv(conn, fds)
    if request_ is None:
        return
    kind = request_.get("kind")
    if kind in {"status", "quit"}:
        wire.send(conn, {"kind": kind, "pid": launcher, "fingerprint": code})
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
        wire.send(conn, {"accepted": False, "why": why})
        _log(f"declined ({why})")
        if why == "other code":
            os.kill(launcher, signal.SIGTERM)  # stale: the client's in-process run starts a fresh one
        return
    wire.send(conn, {"accepted": True})
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
        wire.send(conn, {"kind": "exit", "code": exit_code})
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
            message = wire.recv(conn)
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

    launcher_api._in_runner = True  # what flows.cli's delegate() reads: the command runs here, not again
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

