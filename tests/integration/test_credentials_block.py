"""S3 credentials from a Prefect AwsCredentials block, with no AWS_* variables in the environment."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.generate import run_generate
from schemas.config import S3Config, load_config
from storage.objectstore import open_store
from storage.reader import open_dataset
from storage.versions import file_key, read_manifest
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("prefect_harness")]


def test_flow_writes_to_s3_with_credentials_from_a_block(seaweedfs: SeaweedS3, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from prefect_aws import AwsCredentials

    AwsCredentials(aws_access_key_id=seaweedfs.access_key, aws_secret_access_key=seaweedfs.secret_key,
                   region_name=seaweedfs.region).save("seaweed-test", overwrite=True)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    root = seaweedfs.root(f"block-{tmp_path.name}")
    s3 = S3Config(endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region, max_attempts=2)
    with pytest.raises(Exception, match="(?i)credentials|denied|signature"):
        open_store(root, s3).put_bytes("probe", b"x")

    config = load_config(REPO / "examples" / "quickstart.yaml", [
        f"output.root={root}", f"s3.endpoint_url={seaweedfs.endpoint_url}", f"s3.region={seaweedfs.region}",
        "s3.credentials_block=seaweed-test"], environ={})
    summary = run_generate(config)
    assert summary.rows == 10
    store = open_store(root, config.s3)
    manifest = read_manifest(store, "sample", summary.version)
    fs, base = store.arrow_fs()  # pyarrow gets the block's keys too
    table = pq.read_table(f"{base}/{file_key(manifest, manifest.shards[0])}", filesystem=fs,
                          columns=["id"])
    assert table.num_rows == manifest.shards[0].rows
    text = manifest.model_dump_json() + caplog.text + str(summary.model_dump())
    assert seaweedfs.secret_key not in text and seaweedfs.access_key not in text

    # The reader with the endpoint only in the environment and the keys only in the block: pyarrow,
    # s3fs and DuckDB are handed the block's keys (they cannot see a Prefect block), never shown.
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint_url)
    handle = open_dataset(f"{root}/sample", summary.version, s3=S3Config(credentials_block="seaweed-test"))
    ids = [i for b in handle.iter_batches(columns=["id"]) for i in b.column("id").to_pylist()]
    assert len(ids) == 10 and ids == handle.to_arrow(["id"]).column("id").to_pylist()
    opts = handle.hf_storage_options()
    assert (opts["key"], opts["secret"]) == (seaweedfs.access_key, seaweedfs.secret_key)
    assert opts["client_kwargs"]["endpoint_url"] == seaweedfs.endpoint_url
    secret = handle.duckdb_secret()
    assert secret is not None and f"SECRET '{seaweedfs.secret_key}'" in secret.sql()
    shown = str(secret) + repr(secret) + repr(handle) + repr(handle.store.access)  # type: ignore[attr-defined]
    assert seaweedfs.secret_key not in shown and seaweedfs.access_key not in shown


def test_unknown_block_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no AwsCredentials block named 'nope'"):
        open_store("s3://bucket/prefix", S3Config(credentials_block="nope"))
