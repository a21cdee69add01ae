"""What every `speechpairs` command shares: exit codes, status lines on stderr, and the Prefect API a
command that runs a flow talks to."""

from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_COMMITTED = 0, 1, 2, 3
EXIT_BUSY = 75  # sysexits EX_TEMPFAIL: another launch of the same run is in progress; try again later


def quiet_prefect() -> None:
    """Console shows the progress bar and the summary; INFO logs (per-shard and commit lines) still go
    to the Prefect API/UI. Only Prefect's console *handler* is raised to WARNING (an override of its
    logging.yml): lowering PREFECT_LOGGING_LEVEL instead would drop the records before the API
    handler sees them. Prefect reads both when it is imported, so this runs before that."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def say(message: str) -> None:
    """A status line on stderr (above the progress bar, if one is drawn)."""
    from tqdm import tqdm

    tqdm.write(f"speechpairs: {message}", file=sys.stderr)
    sys.stderr.flush()


def prefect_api() -> str | None:
    """Make sure the command has a Prefect API: PREFECT_API_URL if set, else the shared local server
    (flows/local_server.py: started on first use, reused afterwards). None, after saying why, when
    the local server cannot be started."""
    from flows.local_server import ServerError, use_prefect_api

    try:
        return use_prefect_api(say)
    except ServerError as exc:
        print(f"speechpairs: local Prefect server: {exc}\n(or set PREFECT_API_URL to a running Prefect server)",
              file=sys.stderr)
        return None


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
