"""The CLI's manners: `--version`, quiet exit when the reader of its output leaves (`| head`), and no
usage data sent (DO_NOT_TRACK) unless the user opts in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.support.paths import REPO

SPEECHPAIRS = [sys.executable, "-m", "flows.cli"]


def test_version_is_the_package_version_and_commit_the_manifests_record() -> None:
    from importlib import metadata

    from tasks.run import code_version

    proc = subprocess.run([*SPEECHPAIRS, "--version"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == f"speechpairs {code_version()}\n"
    assert proc.stdout.startswith(f"speechpairs {metadata.version('speechpairs')}")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=False)
    if head.returncode == 0:
        assert proc.stdout.strip().endswith(f"+g{head.stdout.strip()}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.support.datasets_support import make_version

    root = tmp_path_factory.mktemp("root")
    make_version(str(root), "sample", workdir=tmp_path_factory.mktemp("work"))
    return str(root / "sample")


def _reader_gone(args: list[str], unbuffered: bool) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader has already left, as after `| head` exits."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = dict(os.environ)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"  # every print hits the closed pipe mid-command
    else:
        env.pop("PYTHONUNBUFFERED", None)  # the output waits in the buffer until the end
    try:
        proc = subprocess.run([*SPEECHPAIRS, *args], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, env=env,
                              text=True, timeout=120, check=False)
    finally:
        os.close(write_end)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr)


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", ["--help", "--version", "datasets list", "datasets show"])
def test_a_reader_that_leaves_gets_no_traceback(command: str, unbuffered: bool, dataset: str) -> None:
    args = command.split() + ([dataset] if command.startswith("datasets") else [])
    proc = _reader_gone(args, unbuffered)
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback, no "storage error"
    # argparse itself swallows a failed write of --help (exit 0); everything else exits as SIGPIPE would.
    allowed = {0, 128 + signal.SIGPIPE} if command == "--help" and unbuffered else {128 + signal.SIGPIPE}
    assert proc.returncode in allowed


def test_head_gets_its_line_and_nothing_else_is_said(dataset: str) -> None:
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m flows.cli datasets list {dataset} | head -1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.split() == ["version", "created", "(UTC)", "rows", "hours", "tags"]


def test_telemetry_is_off_unless_the_user_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect._internal.analytics.enabled import is_telemetry_enabled

    from flows.cli import main

    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    monkeypatch.setattr("prefect._internal.analytics.enabled.is_ci_environment", lambda: False)
    assert is_telemetry_enabled()  # what Prefect would do without us
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert os.environ["DO_NOT_TRACK"] == "1" and os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert not is_telemetry_enabled()

    monkeypatch.setenv("DO_NOT_TRACK", "0")  # a user who opts in keeps their choice
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["DO_NOT_TRACK"] == "0" and os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_makefile_turns_telemetry_off_unless_the_user_set_it(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "MAKEFLAGS", "MFLAGS")}
    if given is not None:
        env["DO_NOT_TRACK"] = given
    proc = subprocess.run(["make", "--no-print-directory", "--eval",
                           'print-telemetry: ; @echo "$$DO_NOT_TRACK $$PREFECT_SERVER_ANALYTICS_ENABLED"',
                           "print-telemetry"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [expected, "false"]


def test_tests_run_with_telemetry_off() -> None:
    conftest = (REPO / "tests" / "conftest.py").read_text()
    assert 'os.environ.setdefault("DO_NOT_TRACK", "1")' in conftest
    assert os.environ.get("DO_NOT_TRACK")
