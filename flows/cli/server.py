"""`speechpairs server start|stop|status`: the local Prefect server runs use without PREFECT_API_URL."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from flows.cli.base import EXIT_FAILED, EXIT_OK, say


def cmd_server(args: argparse.Namespace) -> int:
    """`server start|stop|status`: the local Prefect server runs use without PREFECT_API_URL.
    Exit 0; `status` exits 1 when no server is running, `start` when it cannot start one."""
    from flows import launcher
    from flows import local_server as local

    explicit = os.environ.get("PREFECT_API_URL")
    note = f"note: PREFECT_API_URL is set ({explicit}): runs use that server, not this one" if explicit else None
    if args.server_command == "stop":
        warm = launcher.stop()
        if warm is not None:
            print(f"stopped the warm launcher (PID {warm})")
        stopped = local.stop_server(say)
        print(f"stopped the local Prefect server (PID {stopped.pid}, {stopped.url})" if stopped
              else f"no local Prefect server recorded in {local.server_dir()}")
        return EXIT_OK
    if args.server_command == "start":
        try:
            local.ensure_server(say)
            launcher.ensure_started()
        except local.ServerError as exc:
            print(f"speechpairs: local Prefect server: {exc}", file=sys.stderr)
            return EXIT_FAILED
    record, state = local.server_status()
    print(f"local Prefect server: {state}")
    if record is not None:
        print(f"  URL:          {record.url} (API {record.api_url})\n  PID:          {record.pid}\n"
              f"  version:      prefect {record.prefect_version}")
    print(f"  data folder:  {local.server_dir()}\n  log:          {local.log_path()}")
    print(f"  launcher:     {_launcher_state(launcher)}")
    if note:
        print(note)
    return EXIT_OK if state == "running" else EXIT_FAILED


def _launcher_state(launcher: Any) -> str:
    if not launcher.enabled():
        return f"off ({launcher.ENV_SWITCH}=off)"
    reply = launcher.request("status")
    if reply is not None:
        return f"warm (PID {reply['pid']}; runs start without re-importing; log {launcher.log_path()})"
    if launcher.running():
        return "starting (importing)"
    return "not running (the next run starts it)"


def add_server_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("server", help="start, stop or inspect the local Prefect server runs use by default")
    srv.add_argument("server_command", choices=["start", "stop", "status"],
                     help="start: start it unless running (prints where); stop: end its process group; "
                          "status: URL, PID, version, data folder")
    srv.set_defaults(func=cmd_server)
