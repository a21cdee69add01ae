"""`make serve`: the Prefect service stack as one process tree that cannot deploy onto another server.

`python -m flows.serve [--host H] [--port P]` refuses a port that is already taken (naming what
answers there), starts `prefect server start` on it, waits until it answers as a Prefect API,
registers prefect.yaml's deployments (`speechpairs deploy`, which creates the work pool), and runs a
process worker. Ctrl-C, SIGTERM or SIGHUP, or either the server or the worker exiting, stops the
rest: the worker first, then the server, each with its process group and anything it started, so no
process is left behind. This is the scheduled service (server + deployments + worker); the bare local
server that `speechpairs run` uses (`speechpairs server`, flows/local_server.py) is separate: its own
data folder and a free port, so the two never share a database.

Children run in sessions of their own, so a terminal's Ctrl-C reaches this script alone and the
teardown happens in order; on Linux they also get SIGTERM should this script die without tearing down.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

from flows.deploy import DEFAULT_POOL, PROJECT_DIR, probe_api

STOP_TIMEOUT_S = 20.0  # per child, after SIGTERM, before SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ServeError(RuntimeError):
    """The stack could not start or lost a part (the message says what, and the fix)."""


class _Stop(BaseException):
    """A stop signal arrived: unwinds the main loop into the teardown."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _connect_host(host: str) -> str:
    """Where a client reaches a server bound to `host` (a wildcard address means this machine)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def api_url(host: str, port: int) -> str:
    """The API URL of a server listening on host:port, as a client on this machine reaches it."""
    target = _connect_host(host)
    return f"http://{f'[{target}]' if ':' in target else target}:{port}/api"


def check_port_free(host: str, port: int) -> None:
    """Raise ServeError unless a server could listen on host:port: something already listening is
    named (a Prefect server, another HTTP server, another program), as is a port that cannot be bound."""
    fix = f"stop it or choose another port, e.g. make serve PORT={port + 1}"
    try:
        with socket.create_connection((_connect_host(host), port), timeout=2):
            listening = True
    except OSError:
        listening = False
    if listening:
        problem = probe_api(api_url(host, port), timeout=3)
        if problem is None:
            raise ServeError(f"a Prefect server already answers at {api_url(host, port)} (another `make serve`, "
                             "or the local server of `speechpairs server start`: see `speechpairs server status`); "
                             f"make serve does not deploy onto a server it did not start: {fix}")
        raise ServeError(f"port {port} on {host} is taken by something that is not a Prefect server "
                         f"({problem}); {fix}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own bind does
            sock.bind(address)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); {fix}") from None


def _child_env(api: str | None = None, server: tuple[str, int] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    if api:
        env["PREFECT_API_URL"] = api
    if server:
        host, port = server
        # The UI (in a browser) calls the API at PREFECT_UI_API_URL, which otherwise defaults to an
        # inherited PREFECT_API_URL or to port 4200: another server. Set it yourself for another host.
        env.pop("PREFECT_API_URL", None)
        env.update(PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port))
        if not (env.get("PREFECT_UI_API_URL") or env.get("PREFECT_SERVER_UI_API_URL")):
            env["PREFECT_UI_API_URL"] = api_url(host, port)
    return env


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def _child_setup() -> None:
    """In the child, before exec: take the stop signals again (blocked while spawning) and, on Linux,
    get SIGTERM when this script dies, even by SIGKILL."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _spawn(procs: list[subprocess.Popen[bytes]], cmd: list[str], env: dict[str, str],
           stdout: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` in a session of its own and record it in `procs`; a stop signal arriving meanwhile
    waits until it is recorded, so the teardown always knows every child."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_DIR, stdout=stdout,
                                stderr=subprocess.STDOUT if stdout else None, start_new_session=True,
                                preexec_fn=_child_setup)  # noqa: PLW1509 - no threads here
        procs.append(proc)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return proc


def _descendants(pid: int) -> list[int]:
    """`pid`'s descendants, from /proc (Linux; [] elsewhere): flow runs a worker starts may sit in
    sessions of their own, out of reach of a signal to the worker's process group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True  # no /proc: kill(0) said it exists


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's process group (it stops what it runs), SIGKILL after STOP_TIMEOUT_S; then
    the same for any descendant that escaped the group."""
    tree = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(STOP_TIMEOUT_S)
            break
        except subprocess.TimeoutExpired:
            continue
    left = [pid for pid in tree if _alive(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while (left := [pid for pid in left if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not left:
            break


def _wait_for_api(server: subprocess.Popen[bytes], api: str, timeout: float, log: Path) -> None:
    """Until the server we started answers as a Prefect API; ServeError (with its log) if it exits or
    does not answer in time."""
    deadline = time.monotonic() + timeout
    problem: str | None = "not started"
    while True:
        if server.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServeError(f"`prefect server start` exited with code {server.returncode} before answering "
                             f"(its log, {log}):\n{tail}")
        problem = probe_api(api, timeout=2)
        if problem is None:
            return
        if time.monotonic() > deadline:
            raise ServeError(f"the server did not answer as a Prefect API within {timeout:.0f} s ({problem}); "
                             f"its log: {log}")
        time.sleep(0.5)


def _signals_raise() -> Callable[[], None]:
    """Stop signals raise _Stop in the main thread; returns a function that ignores them (teardown)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)

    def ignore() -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    return ignore


def serve(host: str, port: int, pool: str = DEFAULT_POOL, startup_timeout: float = 120.0) -> int:
    """Run the stack until a stop signal or a part exits; the exit code (0 never: a service runs on)."""
    ignore_signals = _signals_raise()
    procs: list[subprocess.Popen[bytes]] = []
    api = api_url(host, port)
    try:
        check_port_free(host, port)
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        home.mkdir(parents=True, exist_ok=True)
        log = home / "serve-server.log"
        server_env = _child_env(server=(host, port))
        with log.open("ab") as out:
            server = _spawn(procs, [sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                    "--port", str(port)], server_env, stdout=out)
        print(f"speechpairs serve: Prefect server on {host}:{port} (pid {server.pid}, log {log}); waiting for it "
              "to answer", flush=True)
        _wait_for_api(server, api, startup_timeout, log)
        deploying = _spawn(procs, [sys.executable, "-m", "flows.cli", "deploy", "--api-url", api, "--pool", pool],
                           _child_env(api))
        if deploying.wait() != 0:
            raise ServeError(f"`speechpairs deploy` failed (exit {deploying.returncode}; its message is above)")
        worker = _spawn(procs, [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                                "process"], _child_env(api))
        print(f"speechpairs serve: serving. UI {api.removesuffix('/api')}, API {api}, worker pid {worker.pid} on "
              f"pool {pool}. Ctrl-C stops the worker and the server.", flush=True)
        while True:
            for name, proc in (("server", server), ("worker", worker)):
                if proc.poll() is not None:
                    raise ServeError(f"the {name} exited (code {proc.returncode}); stopping the rest")
            time.sleep(0.5)
    except _Stop as stop:
        print(f"speechpairs serve: {signal.Signals(stop.signum).name} received: stopping the worker and the "
              "server", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except ServeError as exc:
        print(f"speechpairs serve: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        ignore_signals()
        for proc in reversed(procs):
            _stop(proc)
        if procs:
            print("speechpairs serve: stopped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address the server listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    parser.add_argument("--pool", default=DEFAULT_POOL, help=f"process work pool (default {DEFAULT_POOL})")
    parser.add_argument("--startup-timeout", type=float, default=120.0,
                        help="seconds to wait for the server to answer (a first start migrates its database)")
    args: Any = parser.parse_args(argv)
    return serve(args.host, args.port, args.pool, args.startup_timeout)


if __name__ == "__main__":
    sys.exit(main())
