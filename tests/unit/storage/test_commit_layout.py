"""Commit in O(metadata) (manifest layout 2): shards are written once, by the shard task, to data
keys; the commit writes card, config, manifest and ref only. Old layout-1 versions still read.
The janitor removes data objects no committed manifest lists, never a referenced one."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from schemas.arrow import ROW_SCHEMA, hf_features, quarantine_to_table, rows_to_table, schema_to_b64
from schemas.manifest import Manifest, ShardInfo, Stats
from schemas.records import (
    AudioRef,
    Features,
    Generation,
    Message,
    Provenance,
    QuarantineRow,
    ReasonCode,
    Row,
    Stage,
)
from storage.export import Desta2Format, export_version
from storage.gc import collect_garbage
from storage.layout import LEASE, RunLayout, staging_prefix
from storage.lease import LeaseInfo
from storage.objectstore import LocalStore, ObjectStore
from storage.pull import pull_version
from storage.reader import open_dataset
from storage.shards import write_marker, write_parquet_shard
from storage.verify import verify_version
from storage.versions import (
    CommitError,
    commit_version,
    file_key,
    list_versions,
    read_manifest,
    resolve_version,
)
from tests.support.compose_support import flac_tone

DS = "demo"
DAY = 86_400.0
SR = 16_000


def _rows(n: int, run_id: str) -> pa.Table:
    rows = []
    for i in range(n):
        audio = flac_tone(0.25 + 0.05 * i, 200.0 + 50 * i)
        rows.append(Row(
            id=f"sample/{run_id}-{i}", dataset="sample", audio=AudioRef(bytes=audio, path=f"c{i}.flac"),
            audio_uri=f"/corpus/c{i}.wav", audio_sha256=hashlib.sha256(audio).hexdigest(), sampling_rate=SR,
            duration_s=0.25 + 0.05 * i, transcript="hello there", transcript_source="corpus", language="en",
            labels={}, features=Features(duration_s=0.25, pitch_mean_hz=200.0, gender="female"),
            attributes={"gender": "female"}, seed_description="[female] hello there", prompt="What is said?",
            messages=[Message(role="user", content="describe"), Message(role="assistant", content="x")],
            response=f"A woman says hello ({i}).", generation=Generation(backend="template", seed=i, finish_reason="stop"),
            provenance=Provenance(pipeline_version="0", config_hash="c", bins_version="b", run_id=run_id)))
    return rows_to_table(rows)


def _lineage(run_id: str) -> dict[str, Any]:
    return {"run_id": run_id, "code_version": "0", "config_hash": "c", "bins_version": "b", "prompt_pool_hash": "p"}


def stage(store: ObjectStore, run_id: str, n_rows: int = 3) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """What the shard tasks leave: data objects at data keys (content hash in the name) + markers."""
    layout = RunLayout(staging_prefix(DS, run_id))
    table = _rows(n_rows, run_id)
    shards = [write_parquet_shard(store, lambda sha, i=i: layout.data_shard(i, sha), part)
              for i, part in enumerate([table.slice(0, 2), table.slice(2)])]
    q = quarantine_to_table([QuarantineRow(id="bad", dataset="sample", audio_uri="/x.wav", stage=Stage.audio,
                                           reason_code=ReasonCode.too_short, message="short")])
    quarantine = [write_parquet_shard(store, lambda sha: layout.data_quarantine(0, sha), q)]
    for i, s in enumerate(shards):
        write_marker(store, layout.marker(i), {"index": i, "shard": s.model_dump()})
    return shards, quarantine


def commit(store: ObjectStore, run_id: str, shards: list[ShardInfo], quarantine: list[ShardInfo]) -> Manifest:
    rows, quarantined = sum(s.rows for s in shards), sum(q.rows for q in quarantine)
    return commit_version(store, dataset=DS, staged_shards=shards, staged_quarantine=quarantine,
                          lineage=_lineage(run_id),
                          stats=Stats(clips_in=rows + quarantined, rows=rows, quarantined=quarantined),
                          arrow_schema_b64=schema_to_b64(ROW_SCHEMA), hf_features=hf_features(),
                          config={"output": {"dataset": DS}})


class CountingStore(LocalStore):
    """A LocalStore that counts the bytes every call moves (put, copy, get) and the calls."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.moved: dict[str, int] = {"put": 0, "copy": 0, "get": 0}
        self.keys: list[str] = []

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> str:
        self.moved["put"] += len(data)
        self.keys.append(key)
        return super().put_bytes(key, data, **kw)

    def put_file(self, key: str, local_path: str | Path, *, sha256: str | None = None) -> None:
        self.moved["put"] += os.path.getsize(local_path)
        self.keys.append(key)
        super().put_file(key, local_path, sha256=sha256)

    def copy(self, src_key: str, dst_key: str) -> None:
        self.moved["copy"] += self.size(src_key)
        super().copy(src_key, dst_key)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data, etag = super().get_with_etag(key)
        self.moved["get"] += len(data)
        return data, etag

    def iter_bytes(self, key: str, chunk_size: int = 8 * 1024 * 1024) -> Any:
        for chunk in super().iter_bytes(key, chunk_size):
            self.moved["get"] += len(chunk)
            yield chunk


def test_commit_moves_no_data_bytes_and_the_version_resolves_and_verifies(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "root")
    shards, quarantine = stage(store, "run-1")
    assert all(s.path.startswith(f"{DS}/data/run-1/train-0000") for s in shards)
    assert shards[0].path.endswith(f"-{shards[0].sha256[:16]}.parquet")  # the content hash in the name
    data_bytes = sum(s.bytes for s in [*shards, *quarantine])
    store.moved = dict.fromkeys(store.moved, 0)
    store.keys.clear()

    manifest = commit(store, "run-1", shards, quarantine)
    assert store.moved["copy"] == 0
    assert all(k.startswith((f"{DS}/v0001/", f"{DS}/refs/")) for k in store.keys), store.keys
    assert [k.rsplit("/", 1)[1] for k in store.keys] == ["_claim", "config.yaml", "README.md", "manifest.json",
                                                         "latest.json"]
    assert store.moved["put"] + store.moved["get"] < data_bytes  # metadata only: smaller than one copy
    assert store.moved["get"] < 4096  # the ref and nothing of the shards

    assert manifest.layout == 2 and [s.path for s in manifest.shards] == [s.path for s in shards]
    assert [file_key(manifest, q) for q in manifest.quarantine] == [quarantine[0].path]
    assert not (tmp_path / "root" / DS / "v0001" / "data").exists()
    report = verify_version(store, DS, "v0001")
    assert report.ok and report.shards_checked == 3 and report.rows == 3, report.summary()
    handle = open_dataset(f"{tmp_path / 'root'}/{DS}")
    assert handle.to_arrow(["id"]).column("id").to_pylist() == [f"sample/run-1-{i}" for i in range(3)]
    assert handle.shard_uris() == [str(tmp_path / "root" / s.path) for s in shards]


def test_a_missing_data_object_is_never_published(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    shards, quarantine = stage(store, "run-1")
    store.delete(shards[1].path)
    with pytest.raises(CommitError, match="missing"):
        commit(store, "run-1", shards, quarantine)
    assert list_versions(store, DS) == []
    truncated = shards[0].model_copy(update={"bytes": shards[0].bytes + 1})
    with pytest.raises(CommitError, match="bytes"):
        commit(store, "run-1", [truncated], quarantine)
    assert list_versions(store, DS) == []


def test_a_failed_manifest_write_leaves_nothing_visible_and_the_retry_takes_its_claim_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "root")
    shards, quarantine = stage(store, "run-1")
    real_put = store.put_bytes

    def failing(key: str, data: bytes, **kw: Any) -> str:
        if key.endswith("/manifest.json"):
            raise ConnectionError("injected: the store went away before the manifest")
        return real_put(key, data, **kw)

    monkeypatch.setattr(store, "put_bytes", failing)
    with pytest.raises(ConnectionError):
        commit(store, "run-1", shards, quarantine)
    monkeypatch.undo()
    assert list_versions(store, DS) == []
    manifest = commit(store, "run-1", shards, quarantine)  # the same run again: its own claim is taken up
    assert manifest.lineage.version == "v0001" and list_versions(store, DS) == ["v0001"]
    assert resolve_version(store, DS) == "v0001"


def _layout1_version(store: LocalStore) -> Manifest:
    """A version as the code before data keys committed it: shards copied into the version prefix,
    paths relative to it, a manifest without `layout` (old JSON)."""
    prefix = staging_prefix(DS, "run-old")
    shard = write_parquet_shard(store, f"{prefix}/shards/train-00000.parquet", _rows(2, "run-old"))
    manifest = commit(store, "run-old", [shard], [])
    assert manifest.layout == 1 and manifest.shards[0].path == "data/train-00000-of-00001.parquet"
    raw = store.get_bytes(f"{DS}/v0001/manifest.json").decode()
    old = raw.replace('  "layout": 1,\n', "")
    assert old != raw and '"layout"' not in old
    (store.base / DS / "v0001" / "manifest.json").write_text(old)  # byte-for-byte what old code wrote
    return manifest


def test_old_layout_versions_open_verify_export_and_pull_unchanged(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    old = _layout1_version(store)
    assert read_manifest(store, DS, "v0001").layout == 1
    assert verify_version(store, DS, "v0001").ok
    handle = open_dataset(f"{tmp_path / 'root'}/{DS}@v0001")
    assert handle.shard_uris() == [str(tmp_path / "root" / DS / "v0001" / old.shards[0].path)]
    assert handle.num_rows == 2 and handle.to_arrow(["id"]).num_rows == 2
    report = export_version(store, DS, "v0001", tmp_path / "export", Desta2Format())
    assert report.rows == 2
    pulled = pull_version(store, DS, "v0001", tmp_path / "pulled")
    assert pulled.downloaded == ["README.md", old.shards[0].path, "manifest.json"]
    assert (tmp_path / "pulled" / "manifest.json").read_bytes() == store.get_bytes(f"{DS}/v0001/manifest.json")

    # A newer version by data keys beside it: both read, each through its own layout.
    shards, quarantine = stage(store, "run-new")
    new = commit(store, "run-new", shards, quarantine)
    assert (new.lineage.version, new.layout) == ("v0002", 2)
    assert verify_version(store, DS, "v0002").ok and verify_version(store, DS, "v0001").ok
    pulled = pull_version(store, DS, "v0002", tmp_path / "pulled2")
    local = Manifest.model_validate_json((tmp_path / "pulled2" / "manifest.json").read_bytes())
    assert local.layout == 1 and [s.path for s in local.shards] == ["data/train-00000-of-00002.parquet",
                                                                     "data/train-00001-of-00002.parquet"]
    for s in [*local.shards, *local.quarantine]:
        assert hashlib.sha256((tmp_path / "pulled2" / s.path).read_bytes()).hexdigest() == s.sha256


def _age(root: Path, older: float) -> None:
    for p in root.rglob("*"):
        os.utime(p, (older, older))


def test_gc_removes_only_unreferenced_data_objects(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    kept1, q1 = stage(store, "run-1")
    commit(store, "run-1", kept1, q1)
    kept2, q2 = stage(store, "run-2", n_rows=4)
    commit(store, "run-2", kept2, q2)
    # A retried shard attempt of run-2 with other bytes (never referenced) and a run killed before commit.
    orphan = write_parquet_shard(store, lambda sha: RunLayout(staging_prefix(DS, "run-2")).data_shard(0, sha),
                                 _rows(1, "retry"))
    dead, _ = stage(store, "run-dead")
    _age(root, time.time() - 2 * DAY)
    referenced = {s.path for s in [*kept1, *q1, *kept2, *q2]}

    dry = collect_garbage(store, DS, DAY, dry_run=True)
    data = {p.prefix: p for p in dry.removed if p.kind == "data"}
    assert set(data) == {f"{DS}/data/run-2/", f"{DS}/data/run-dead/"}
    assert data[f"{DS}/data/run-2/"].bytes == orphan.bytes and data[f"{DS}/data/run-2/"].objects == 1
    assert data[f"{DS}/data/run-dead/"].bytes == sum(s.bytes for s in dead) + store.size(
        next(k for k in store.list(f"{DS}/data/run-dead/quarantine-")))
    assert dry.referenced_objects == len(referenced)
    assert store.exists(orphan.path)  # a dry run removes nothing

    report = collect_garbage(store, DS, DAY)
    assert report.bytes_removed == dry.bytes_removed
    left = set(store.list(f"{DS}/data/"))
    assert left == referenced  # every referenced object stays, every other one went
    for v in ("v0001", "v0002"):
        assert verify_version(store, DS, v).ok

    # Zero threshold, far in the future: still nothing a manifest lists goes.
    collect_garbage(store, DS, 0.0, now=time.time() + 365 * DAY)
    assert set(store.list(f"{DS}/data/")) == referenced


def test_gc_keeps_data_objects_of_a_young_or_leased_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    stage(store, "run-x")
    layout = RunLayout(staging_prefix(DS, "run-x"))
    _age(root / DS / "data", time.time() - 2 * DAY)  # data old, its staging (markers) young: resumable
    assert collect_garbage(store, DS, DAY).removed == []
    assert len(list(store.list(f"{DS}/data/run-x/"))) == 3

    _age(root, time.time() - 2 * DAY)
    live = LeaseInfo(holder="h", host="elsewhere", pid=1, started_at=datetime.now(UTC),
                     expires_at=datetime.now(UTC) + timedelta(minutes=5))
    store.put_bytes(layout.lease, live.model_dump_json().encode())
    os.utime(root / DS / "_staging" / "run-x" / LEASE, (time.time() - 2 * DAY,) * 2)
    report = collect_garbage(store, DS, DAY)
    assert report.removed == [] and len(list(store.list(f"{DS}/data/run-x/"))) == 3

    store.delete(layout.lease)  # the run is gone for good: its staging and its data go together
    report = collect_garbage(store, DS, DAY)
    assert sorted(p.kind for p in report.removed) == ["data", "staging"]
    assert list(store.list(f"{DS}/data/")) == [] and list(store.list(f"{DS}/_staging/")) == []
