"""`datasets compose` on a real S3 server (SeaweedFS), racing a run's commit to the same target:
both become versions (distinct claims, create-only manifests, CAS ref), each valid and readable;
and a composed version of split-audio sources (audio stored once) through gc, verify and the reader."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import storage.compose
from schemas.config import S3Config
from schemas.manifest import Manifest
from storage.compose import compose_version, load_part
from storage.gc import collect_garbage
from storage.layout import audio_prefix
from storage.objectstore import ObjectStore, open_store
from storage.reader import open_dataset
from storage.verify import verify_version
from storage.versions import commit_version, list_versions, resolve_version
from tests.support.compose_support import commit_split, commit_tables, rows_table, write_split_shard
from tests.support.seaweedfs import SeaweedS3


def _ids(uri: str, s3: S3Config) -> list[str]:
    return sorted(open_dataset(uri, s3=s3).to_arrow(["id"]).column("id").to_pylist())


@pytest.mark.s3
def test_compose_and_a_run_commit_to_one_dataset_at_once(seaweedfs: SeaweedS3, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = seaweedfs.root(f"compose-{tmp_path.name}")
    s3 = S3Config(endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region)
    store: ObjectStore = open_store(root, s3)
    commit_tables(store, "A", "run-a", [rows_table([("a/0", "a"), ("a/1", "a")]), rows_table([("a/2", "a")])])
    commit_tables(store, "B", "run-b", [rows_table([("b/0", "b"), ("b/1", "b")])], layout1=True)
    parts = [load_part(store, "A", "latest"), load_part(store, "B", "latest")]

    start = threading.Barrier(2, timeout=60)

    def at_the_start_line(*args: Any, **kwargs: Any) -> Manifest:
        start.wait()  # both commits begin together, after compose has read its sources
        return commit_version(*args, **kwargs)

    monkeypatch.setattr(storage.compose, "commit_version", at_the_start_line)
    results: dict[str, Manifest] = {}
    errors: list[BaseException] = []

    def composer() -> None:
        try:
            results["compose"] = compose_version(store, "C", parts, code_version="test")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(exc)

    def run() -> None:
        try:
            start.wait()
            results["run"] = commit_tables(store, "C", "run-c", [rows_table([("c/0", "c"), ("c/1", "c")])])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=composer), threading.Thread(target=run)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    composed, ran = results["compose"].lineage.version, results["run"].lineage.version
    assert {composed, ran} == {"v0001", "v0002"}
    assert list_versions(store, "C") == ["v0001", "v0002"]
    assert resolve_version(store, "C", "latest") == "v0002"
    assert results["compose"].lineage.parents == ["A@v0001", "B@v0001"]
    assert "B/v0001/data/train-00000-of-00001.parquet" in [s.path for s in results["compose"].shards]
    for v in (composed, ran):
        assert verify_version(store, "C", v).ok
    assert _ids(f"{root}/C@{composed}", s3) == ["a/0", "a/1", "a/2", "b/0", "b/1"]
    assert _ids(f"{root}/C@{ran}", s3) == ["c/0", "c/1"]
    assert not list(store.list("C/data/compose-"))  # nothing rewritten: no bytes of data copied


@pytest.mark.s3
def test_split_audio_sources_compose_and_survive_gc(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    root = seaweedfs.root(f"compose-audio-{tmp_path.name}")
    s3 = S3Config(endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region)
    store: ObjectStore = open_store(root, s3)
    mixed = rows_table([("m/0", "a"), ("m/1", "b"), ("m/2", "a")])
    m = commit_split(store, "M", "run-m", [mixed])
    dead = write_split_shard(store, "M", "run-dead", 0, rows_table([("d/0", "a")]))  # never committed
    c = compose_version(store, "C", [load_part(store, "M", "latest")], exclude=["b"], code_version="test")
    assert c.shards[0].audio == m.shards[0].audio and dead.audio is not None

    # S3 timestamps cannot be set back: look from two days ahead.
    report = collect_garbage(store, "M", 86_400.0, now=time.time() + 2 * 86_400.0)
    assert sorted(p.kind for p in report.removed) == ["audio", "data", "staging", "staging"]
    left = set(store.list(audio_prefix("M")))
    assert m.shards[0].audio is not None and m.shards[0].audio.path in left
    assert dead.audio.path not in left and len(left) == 2  # C's audio file and its clip index
    assert verify_version(store, "C", "v0001").ok
    want = {r["id"]: r["audio"]["bytes"] for r in mixed.to_pylist() if r["dataset"] == "a"}
    rows = open_dataset(f"{root}/C", s3=s3).to_arrow(["id", "audio"]).to_pylist()
    assert {r["id"]: r["audio"]["bytes"] for r in rows} == want
