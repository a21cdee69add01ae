"""`speechpairs` command line: run a config; list, show, verify, pull, tag, diff, export and gc datasets.

Exit codes: 0 ok, 2 unusable config or corpus (message names the key/file and the fix), 1 a run
that failed after starting (the staging area keeps finished shards for the re-run), 3 a run that
finished but was not committed (no row, too many quarantined, or a service outage: the message
names the top reasons; staging is kept), 75 another launch of the same run holds its lease
(`output.when_running: wait` queues instead).
`datasets …`: 2 for a bad URI, tag name or duration and for a version/ref that does not exist;
1 for a version that fails verification, a pull or export that hits a corrupt shard or row (named), or
a store that cannot be reached.

One module per command group: run.py, datasets.py, deploy.py, calibrate.py, server.py; base.py holds
what they share. Each imports its heavy dependencies inside the command, so `--help` and `--version`
stay fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from flows.cli.calibrate import add_calibrate_parser
from flows.cli.datasets import add_datasets_parser
from flows.cli.deploy import add_deploy_parser
from flows.cli.run import add_run_parser
from flows.cli.server import add_server_parser


def _patient_temporary_server() -> None:
    """Without PREFECT_API_URL a run starts a temporary Prefect server. On a fresh machine its first
    start creates and migrates the database, which can outlast Prefect's 20 s default
    (docs/decisions.md); 120 s leaves room. Prefect reads its settings once, when it is imported, so
    `main` calls this before anything imports it."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechpairs", description="Self-generated speech-text pairs.")
    parser.add_argument("--version", action=_VersionAction, help="print the version (and git commit) and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)  # subcommands in the order `--help` lists them
    add_deploy_parser(sub)
    add_datasets_parser(sub)
    add_calibrate_parser(sub)
    add_server_parser(sub)
    return parser


def _telemetry_off() -> None:
    """No usage data leaves the machine unless the user opts in: DO_NOT_TRACK is the standard switch
    (Prefect's client honours it), PREFECT_SERVER_ANALYTICS_ENABLED the server's. A value the user
    set wins. Prefect reads its settings when imported, so `main` calls this first."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _version() -> str:
    """`speechpairs --version`: the package version, plus `+g<commit>` in a git checkout, spelled as
    tasks/run.py's code_version() records it in every version manifest (a test keeps the two equal);
    not imported from there, since importing the pipeline takes seconds."""
    import subprocess
    from importlib import metadata
    from pathlib import Path

    version = metadata.version("speechpairs")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{sha}" if sha else version


class _VersionAction(argparse.Action):
    """Like argparse's `version` action, computed only when asked for (it runs git)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(f"speechpairs {_version()}")
        parser.exit()


def prepare_environment() -> None:
    """What every command sets before anything imports Prefect (the warm launcher does the same)."""
    _patient_temporary_server()
    _telemetry_off()


def main(argv: Sequence[str] | None = None) -> int:
    prepare_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    from flows.launcher import delegate

    delegated = delegate(argv)  # a warm launcher runs it (flows/launcher/), else this process does
    if delegated is not None:
        return delegated
    try:
        try:
            args = build_parser().parse_args(argv)
            code = int(args.func(args))
        finally:
            sys.stdout.flush()  # a reader that left (`speechpairs … | head`) shows here, where it is handled
    except BrokenPipeError:
        # The reader has what it wanted: exit quietly, as a shell tool killed by SIGPIPE does, and keep
        # the interpreter's final flush from printing a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code
