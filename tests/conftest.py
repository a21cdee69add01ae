"""Shared fixtures. Prefect's test harness is session-scoped and only started by flow tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")  # no usage data from Prefect clients in tests
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A CLI run without PREFECT_API_URL starts the local Prefect server under SPEECHPAIRS_HOME: never the
# user's real one from a test (tests that exercise the server set their own folder per test).
if "SPEECHPAIRS_HOME" not in os.environ:
    import tempfile

    os.environ["SPEECHPAIRS_HOME"] = tempfile.mkdtemp(prefix="speechpairs-test-home-")

pytest_plugins = ["tests.seaweedfs"]

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO / "examples" / "sample_corpus"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def prefect_api(prefect_harness: None) -> str:
    """The session harness's server: `speechpairs` subprocesses talk to it instead of each starting
    their own temporary one."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url and url.startswith("http://127.0.0.1:"), url
    return str(url)


@pytest.fixture(scope="session")
def sample_corpus() -> Path:
    return SAMPLE_CORPUS


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip cleanly (with the reason) on machines without CUDA."""
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
