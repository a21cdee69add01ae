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
from storage.versions import file_key, list_versions, resolve_version
from tests.support.datasets_support import sample_config
from tests.support.seaweedfs import WeedServer

pytestmark = pytest.mark.s3


def _config(server: WeedServer, tmp_path: Path, prefix: str) -> RunConfig:
    return sample_config(server.info.root(prefix), "outage", workdir=tmp_path, shard_size=4,
                         s3_endpoint=server.info.endpoint_url, s3_region=server.info.region,
                         overrides=["s3.max_attempts=2"])


def _kill_on_call(server: WeedServer, original: Callable[..., Any], at: int, calls: list[str]) -> Callable[..., Any]:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        if len(calls) == at:
            server.kill()
        return original(self, *args, **kwargs)

    return wrapper


def _kill_before(server: WeedServer, original: Callable[..., Any], suffix: str, calls: list[str]) -> Callable[..., Any]:
    """Kill the server right before the first write of a key ending in `suffix` (one commit step)."""
    def wrapper(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        if key.endswith(suffix) and not calls:
            calls.append(key)
            server.kill()
        return original(self, key, *args, **kwargs)

    return wrapper


def _restart(server: WeedServer) -> None:
    server.start()
    assert server.wait_ready(), server.log_tail()


def _assert_complete(store: objectstore.ObjectStore, dataset: str, version: str, rows: int) -> None:
    from storage.versions import read_manifest

    manifest = read_manifest(store, dataset, version)
    assert manifest.stats.rows == sum(s.rows for s in manifest.shards) == rows
    for shard in manifest.shards:
        key = file_key(manifest, shard)
        assert store.size(key) == shard.bytes and store.sha256(key) == shard.sha256


def test_outage_mid_shard_upload(weed_server: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(weed_server, tmp_path, "mid-upload")
    uploads: list[str] = []
    original = objectstore.S3Store.put_file
    # Per shard: its audio file (audio stored once, <dataset>/audio/<clip-key>-<sha>.parquet), then its rows.
    monkeypatch.setattr(objectstore.S3Store, "put_file", _kill_on_call(weed_server, original, 4, uploads))
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises for a dead endpoint
        run_plain(config)
    # Shard tasks upload to data keys (<dataset>/data/<run-id>/train-00001-<sha256[:16]>.parquet).
    assert len(uploads) == 4 and Path(uploads[3]).name.startswith("train-00001-") and "/data/" in uploads[3]
    assert ["/audio/" in u for u in uploads] == [True, False, True, False]
    _restart(weed_server)
    store = open_store(config.output.root, config.s3)
    with pytest.raises(NotFound):
        resolve_version(store, "outage", "latest")
    assert list_versions(store, "outage") == []

    uploads.clear()
    monkeypatch.setattr(objectstore.S3Store, "put_file", _kill_on_call(weed_server, original, 0, uploads))
    manifest = run_plain(config)
    # Shard 0 finished before the outage (its marker exists): only shards 1 and 2 are redone, and
    # shard 1's clips, measured and stored before the outage, come from its clip cache.
    rows = [u for u in uploads if "/audio/" not in u]
    assert sorted(Path(u).name.rsplit("-", 1)[0] for u in rows) == ["train-00001", "train-00002"]
    assert len(uploads) - len(rows) == 1  # shard 2's audio file only
    assert manifest.lineage.version == resolve_version(store, "outage", "latest")
    _assert_complete(store, "outage", manifest.lineage.version, 10)


@pytest.mark.parametrize("step", ["README.md", "manifest.json"])
def test_outage_mid_commit(weed_server: WeedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           step: str) -> None:
    """The commit writes metadata only (card, then manifest): the store dies right before one of them."""
    config = _config(weed_server, tmp_path, f"mid-commit-{step.split('.')[0].lower()}")
    writes: list[str] = []
    original = objectstore.S3Store.put_bytes
    monkeypatch.setattr(objectstore.S3Store, "put_bytes", _kill_before(weed_server, original, f"/{step}", writes))
    with pytest.raises(Exception):  # noqa: B017
        run_plain(config)
    assert len(writes) == 1
    _restart(weed_server)
    store = open_store(config.output.root, config.s3)
    assert list_versions(store, "outage") == []  # a claimed prefix without manifest is not a version
    with pytest.raises(NotFound):
        resolve_version(store, "outage", "latest")

    monkeypatch.setattr(objectstore.S3Store, "put_bytes", original)
    manifest = run_plain(config)
    assert manifest.layout == 2 and all("/data/" in s.path for s in manifest.shards)
    assert list_versions(store, "outage") == [manifest.lineage.version]
    assert resolve_version(store, "outage", "latest") == manifest.lineage.version
    _assert_complete(store, "outage", manifest.lineage.version, 10)
