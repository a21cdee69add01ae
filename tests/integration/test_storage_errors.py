"""Storage failures in an operator's words: which of bucket missing / access denied / bad credentials /
endpoint unreachable it is and which setting to check, found before any clip by a probe write."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from schemas.config import S3Config
from storage.objectstore import open_store
from storage.preflight import StorageProblem, check_writable, explain
from tests.support.paths import REPO
from tests.support.seaweedfs import READER_ACCESS_KEY, READER_SECRET_KEY, SeaweedS3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _problem(root: str, s3: S3Config | None = None) -> StorageProblem:
    with pytest.raises(StorageProblem) as err:
        check_writable(open_store(root, s3), "ds")
    return err.value


def test_a_writable_local_root_passes_and_keeps_nothing(tmp_path: Path) -> None:
    check_writable(open_store(str(tmp_path / "out")), "ds")
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_a_local_root_that_is_a_file_is_not_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    problem = _problem(str(tmp_path / "file"))
    assert problem.kind == "not writable" and str(tmp_path / "file") in str(problem)
    assert "output.root" in str(problem)


@pytest.mark.s3
def test_s3_writable_root_passes(seaweedfs: SeaweedS3) -> None:
    cfg = S3Config(endpoint_url=seaweedfs.endpoint_url)
    check_writable(open_store(seaweedfs.root("probe-ok"), cfg), "ds")
    assert list(open_store(seaweedfs.root("probe-ok"), cfg).list("ds/")) == []


@pytest.mark.s3
def test_s3_missing_bucket_is_named_even_for_a_key_that_may_not_write(seaweedfs: SeaweedS3,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = S3Config(endpoint_url=seaweedfs.endpoint_url)
    problem = _problem("s3://no-such-bucket-here/p", cfg)
    assert problem.kind == "bucket missing" and "create the bucket 'no-such-bucket-here'" in str(problem)
    assert seaweedfs.endpoint_url in str(problem)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_KEY)
    assert _problem("s3://no-such-bucket-here/p", cfg).kind == "bucket missing"  # not "AccessDenied … PutObject"


@pytest.mark.s3
def test_s3_read_only_key_is_access_denied(seaweedfs: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_KEY)
    problem = _problem(seaweedfs.root("denied"), S3Config(endpoint_url=seaweedfs.endpoint_url))
    assert problem.kind == "access denied" and "s3:PutObject" in str(problem)
    assert READER_SECRET_KEY not in str(problem)


@pytest.mark.s3
def test_s3_wrong_secret_is_bad_credentials(seaweedfs: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    problem = _problem(seaweedfs.root("badkey"), S3Config(endpoint_url=seaweedfs.endpoint_url))
    assert problem.kind == "bad credentials" and "AWS_SECRET_ACCESS_KEY" in str(problem)
    assert "not-the-secret-123" not in str(problem)


@pytest.mark.s3
def test_s3_unreachable_endpoint_is_found_fast(seaweedfs: SeaweedS3) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    problem = _problem(seaweedfs.root("gone"), S3Config(endpoint_url=url))
    assert problem.kind == "endpoint unreachable" and url in str(problem) and "s3.endpoint_url" in str(problem)
    assert time.monotonic() - started < 15  # two attempts, not the run's eight with backoff


def test_pyarrow_error_texts_are_classified() -> None:
    problem = explain(OSError("When reading information for key 'a' in bucket 'b': AWS Error ACCESS_DENIED "
                              "during HeadObject operation: No response body."))
    assert problem is not None and problem.kind == "access denied" and "s3:GetObject" in str(problem)
    assert explain(ValueError("not storage")) is None


@pytest.mark.s3
def test_cli_run_names_the_problem_and_setting_before_any_clip(seaweedfs: SeaweedS3, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    rc = main(["run", str(REPO / "examples" / "quickstart.yaml"), "--no-progress",
               "--set", "output.root=s3://no-such-bucket-here/x", "--set", f"s3.endpoint_url={seaweedfs.endpoint_url}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("speechpairs: output.root: bucket missing:"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc = main(["datasets", "list", "s3://no-such-bucket-here/x/sample", "--s3-endpoint-url", seaweedfs.endpoint_url])
    err = capsys.readouterr().err
    assert rc == 1 and "storage error: bucket missing" in err, err
