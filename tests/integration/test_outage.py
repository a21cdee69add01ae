"""A real S3 outage (SIGKILL of SeaweedFS) in the middle of a shard upload and of the commit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flows.generate import run_plain
from schemas.config import RunConfig
from storage import objectstore
from storage.objectstore import NotFound, open_store
from storage.versions import list_versions, resolve_version
from tests.support.datasets_support import sample_config
from tests.support.seaweedfs import WeedServer

pytestmark = pytest.mark.s3


def _config(server: WeedServer, tmp_path: Path, prefix: str) -> RunConfig:
    return sample_config(server.info.root(prefix), "outage", workdir=tmp_path, shard_size=4,
                         s3_endpoint=server.info.endpoint_url, s3_region=server.info.region,
                         overrides=["s3.max_attempts=2"])


def _kill_on_call(server: WeedServer, original: Callable[..., Any], at: int, calls: list[str]) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any) -> Any:
        calls.append(str(args[0]))
        if len(calls) == at:
            server.kill()
        return original(self, *args)

    return wrapper


def _restart(server: WeedServer) -> None:
    server.start()
    assert server.wait_ready(), server.log_tail()


def _assert_complete(store: objectstore.ObjectStore, dataset: str, version: str, rows: int) -> None:
    from storage.versions import read_manifest

    manifest = read_manifest(store, dataset, version)
    assert manifest.stats.rows == sum(s.rows for s in manifest.shards) == rows
    for shard in manifest.shards:
        key = f"{dataset}/{version}/{shard.path}"
        assert store.size(key) == shard.bytes and store.sha256(key) == shard.sha256


def test_outage_mid_shard_upload(weed_server: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(weed_server, tmp_path, "mid-upload")
    uploads: list[str] = []
    original = objectstore.S3Store.put_file
    monkeypatch.setattr(objectstore.S3Store, "put_file", _kill_on_call(weed_server, original, 2, uploads))
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises for a dead endpoint
        run_plain(config)
    assert len(uploads) == 2 and uploads[1].endswith("train-00001.parquet")
    _restart(weed_server)
    store = open_store(config.output.root, config.s3)
    with pytest.raises(NotFound):
        resolve_version(store, "outage", "latest")
    assert list_versions(store, "outage") == []

    uploads.clear()
    monkeypatch.setattr(objectstore.S3Store, "put_file", _kill_on_call(weed_server, original, 0, uploads))
    manifest = run_plain(config)
    # Shard 0 finished before the outage (its marker exists): only shards 1 and 2 are redone.
    assert sorted(Path(u).name for u in uploads) == ["train-00001.parquet", "train-00002.parquet"]
    assert manifest.lineage.version == resolve_version(store, "outage", "latest")
    _assert_complete(store, "outage", manifest.lineage.version, 10)


def test_outage_mid_commit(weed_server: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(weed_server, tmp_path, "mid-commit")
    copies: list[str] = []
    original = objectstore.S3Store.copy
    monkeypatch.setattr(objectstore.S3Store, "copy", _kill_on_call(weed_server, original, 2, copies))
    with pytest.raises(Exception):  # noqa: B017
        run_plain(config)
    assert len(copies) == 2
    _restart(weed_server)
    store = open_store(config.output.root, config.s3)
    assert list_versions(store, "outage") == []  # a claimed prefix without manifest is not a version
    with pytest.raises(NotFound):
        resolve_version(store, "outage", "latest")

    monkeypatch.setattr(objectstore.S3Store, "copy", original)
    manifest = run_plain(config)
    assert list_versions(store, "outage") == [manifest.lineage.version]
    assert resolve_version(store, "outage", "latest") == manifest.lineage.version
    _assert_complete(store, "outage", manifest.lineage.version, 10)
