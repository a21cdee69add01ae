"""`speechpairs` with a `kill -9` at a named point of the version commit (tests/integration/test_resume.py).

    python -m tests.resume_support KILL_POINT run CONFIG [--no-progress ...]

runs the real CLI (`flows.cli.main`) in this process, after wrapping one function of the commit
protocol (storage/versions.py) so that reaching the point sends SIGKILL to this very process: no
`finally`, no atexit, no flush, exactly like `kill -9` from outside, but at a deterministic point
instead of a timing window a few milliseconds wide. Points, in commit order:

  before-claim      every shard finished and marked, the commit not begun (`_claim_version` call)
  claimed           `v<N>/_claim` exists, nothing else of the version written (`_check_present` call)
  manifest-written  `v<N>/manifest.json` written (the version exists), `refs/latest` not yet moved
  ref-moved         `refs/latest` moved to the new version, `committed.json` not yet written

The product code is untouched: the functions are looked up as module globals at call time, so
replacing them on the module object before the run is enough.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

KILL_POINTS = ("before-claim", "claimed", "manifest-written", "ref-moved")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _before(func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _die()
        return func(*args, **kwargs)  # pragma: no cover - never reached

    return wrapper


def _after_latest(func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(store: Any, dataset: str, version: str, name: str = "latest", **kwargs: Any) -> Any:
        result = func(store, dataset, version, name, **kwargs)
        if name == "latest":
            _die()
        return result

    return wrapper


def _before_latest(func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(store: Any, dataset: str, version: str, name: str = "latest", **kwargs: Any) -> Any:
        if name == "latest":
            _die()
        return func(store, dataset, version, name, **kwargs)

    return wrapper


def install(point: str) -> None:
    from storage import versions

    if point == "before-claim":
        versions._claim_version = _before(versions._claim_version)  # type: ignore[assignment]
    elif point == "claimed":
        versions._check_present = _before(versions._check_present)  # type: ignore[assignment]
    elif point == "manifest-written":
        versions.set_ref = _before_latest(versions.set_ref)  # type: ignore[assignment]
    elif point == "ref-moved":
        versions.set_ref = _after_latest(versions.set_ref)  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown kill point {point!r}; one of {', '.join(KILL_POINTS)}")


def main(argv: list[str]) -> int:
    from flows.cli import main as cli_main

    install(argv[0])
    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
