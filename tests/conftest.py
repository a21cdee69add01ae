"""Shared fixtures. Prefect's test harness is session-scoped and only started by flow tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.support.paths import SAMPLE_CORPUS
from tests.support.speech import TEXT, to_16k

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")  # no usage data from Prefect clients in tests
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A CLI run without PREFECT_API_URL starts the local Prefect server under SPEECHPAIRS_HOME: never the
# user's real one from a test (tests that exercise the server set their own folder per test).
if "SPEECHPAIRS_HOME" not in os.environ:
    import tempfile

    os.environ["SPEECHPAIRS_HOME"] = tempfile.mkdtemp(prefix="speechpairs-test-home-")

# No warm launcher (flows/launcher/) behind CLI runs unless a test asks for one: it would outlive the
# test and import the pipeline in the background of every other test.
os.environ.setdefault("SPEECHPAIRS_LAUNCHER", "off")

pytest_plugins = ["tests.support.seaweedfs"]


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


@pytest.fixture(scope="module")
def espeak(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., np.ndarray]:
    """`synth(*espeak_args, text=TEXT)` -> 16 kHz float32 speech from espeak-ng (known pitch, speed, voice)."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        pytest.skip("espeak-ng binary not found (apt-get install espeak-ng) - synthetic speech tests need it")
    folder = tmp_path_factory.mktemp("espeak")
    counter = iter(range(10**6))

    def synth(*args: str, text: str = TEXT) -> np.ndarray:
        out = folder / f"utt{next(counter)}.wav"
        subprocess.run([binary, *args, "-w", str(out), text], check=True, capture_output=True, timeout=60)
        audio, sr = sf.read(out, dtype="float32")
        return to_16k(audio, sr)

    return synth


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# The layers (README "Tests"): tests/unit holds plain functions on local files; tests/integration starts
# real servers (the Prefect API, SeaweedFS), clusters, subprocess CLIs and kill -9s. A storage contract test
# parametrized over a local root and S3 keeps its S3 case next to the local one, marked `s3`, so the unit
# layer runs offline under `-m "not s3"` (`make test-fast`). Each test gets its layer's time limit
# (pytest-timeout; an explicit @pytest.mark.timeout wins): a unit test needing a minute is misplaced or hung.
LAYER_TIMEOUT_S = {"unit": 60, "integration": 600}
S3_FIXTURES = {"seaweedfs", "seaweedfs_server", "weed_server"}
SERVER_FIXTURES = {"prefect_harness", "prefect_api"}
TESTS = Path(__file__).resolve().parent


def _layer(item: pytest.Item) -> str | None:
    path = Path(item.path).resolve()
    return path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Layer rules and limits; `gpu` tests skip cleanly (with the reason) on machines without CUDA."""
    misplaced = []
    for item in items:
        layer = _layer(item)
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & S3_FIXTURES:
            item.add_marker(pytest.mark.s3)
        if layer == "unit" and fixtures & SERVER_FIXTURES:
            misplaced.append(item.nodeid)
        limit = LAYER_TIMEOUT_S.get(layer or "")
        if limit is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))
    if misplaced:
        raise pytest.UsageError("unit tests that start the Prefect API belong in tests/integration: "
                                + ", ".join(misplaced))
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
