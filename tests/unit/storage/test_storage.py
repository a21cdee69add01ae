"""Storage: object stores (local dir and a real SeaweedFS S3), shards, the commit protocol, reader."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from schemas.arrow import (
    QUARANTINE_SCHEMA,
    ROW_SCHEMA,
    hf_features,
    quarantine_to_table,
    rows_to_table,
    schema_to_b64,
)
from schemas.config import S3Config
from schemas.manifest import Manifest, ModelInfo, ShardInfo, Stats
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
from storage.layout import staging_prefix
from storage.objectstore import LocalStore, NotFound, ObjectStore, PreconditionFailed, S3Store, open_store
from storage.reader import manifest_summary, open_manifest, parse_dataset_uri
from storage.s3 import ProfileDefaults, resolve_s3
from storage.shards import read_marker, write_marker, write_parquet_shard
from storage.versions import (
    CommitError,
    VersionNotFound,
    commit_version,
    list_versions,
    read_manifest,
    resolve_version,
    set_ref,
)
from tests.support.seaweedfs import SeaweedS3

DATASET = "demo"
SR = 16_000


# --------------------------------------------------------------------------------------------
# fixtures and builders
# --------------------------------------------------------------------------------------------


def _s3_store(server: SeaweedS3) -> S3Store:
    cfg = S3Config(endpoint_url=server.endpoint_url, region=server.region, addressing_style="path")
    store = open_store(server.root(f"t-{uuid.uuid4().hex[:12]}"), cfg)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """The same tests against a local directory and a real S3 server (fresh prefix per test)."""
    if request.param == "local":
        yield LocalStore(tmp_path / "root")
    else:
        yield _s3_store(request.getfixturevalue("seaweedfs"))


def flac_bytes(seconds: float = 0.5, freq: float = 220.0) -> bytes:
    t = np.arange(int(SR * seconds)) / SR
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR, format="FLAC")
    return buf.getvalue()


def make_rows(n: int, run_id: str = "run-1") -> list[Row]:
    rows = []
    for i in range(n):
        audio = flac_bytes(0.25 + 0.25 * i, 200.0 + 50 * i)
        rows.append(Row(
            id=f"clip-{i:03d}", dataset="sample", audio=AudioRef(bytes=audio, path=f"clip-{i:03d}.flac"),
            audio_uri=f"/corpus/clip-{i:03d}.wav", audio_sha256=hashlib.sha256(audio).hexdigest(),
            sampling_rate=SR, duration_s=0.25 + 0.25 * i, transcript="hello there" if i else None,
            transcript_source="corpus" if i else None, language="en", labels={"speaker": f"s{i}"},
            features=Features(duration_s=0.25 + 0.25 * i, pitch_mean_hz=200.0 + 50 * i, gender="female"),
            attributes={"gender": "female", "pitch": "high"},
            seed_description="[female, high pitch] hello there",
            prompt="What can you hear from the audio?",
            messages=[Message(role="user", content="describe"), Message(role="assistant", content="x")],
            response=f"A woman says hello ({i}).",
            generation=Generation(backend="template", seed=i, finish_reason="stop"),
            provenance=Provenance(pipeline_version="0.1.0", config_hash="cfg123", bins_version="bins-1",
                                  extractor_versions={"pitch": "1"}, run_id=run_id),
        ))
    return rows


def quarantine_table() -> pa.Table:
    return quarantine_to_table([QuarantineRow(id="bad-1", dataset="sample", audio_uri="/corpus/bad.wav",
                                              stage=Stage.audio, reason_code=ReasonCode.too_short,
                                              message="0.1 s < 0.3 s")])


def lineage(run_id: str) -> dict:
    return {
        "run_id": run_id, "code_version": "0.1.0+test", "config_hash": "cfg123", "bins_version": "bins-1",
        "prompt_pool_hash": "pool-abc", "models": [ModelInfo(role="llm", name="template").model_dump()],
        "sampling": {"temperature": 0.05}, "flow_run_id": None,
    }


def stage_run(store: ObjectStore, run_id: str, n_rows: int = 3) -> tuple[list[ShardInfo], list[ShardInfo], pa.Table]:
    """Write one row shard (split in two) and one quarantine shard into the run's staging area."""
    prefix = staging_prefix(DATASET, run_id)
    table = rows_to_table(make_rows(n_rows, run_id))
    shards = [
        write_parquet_shard(store, f"{prefix}/shards/train-00000.parquet", table.slice(0, 2)),
        write_parquet_shard(store, f"{prefix}/shards/train-00001.parquet", table.slice(2), compression="none"),
    ]
    quarantine = [write_parquet_shard(store, f"{prefix}/quarantine/part-00000.parquet", quarantine_table())]
    for i, s in enumerate(shards):
        write_marker(store, f"{prefix}/markers/shard-{i:05d}.json", {"index": i, "shard": s.model_dump()})
    return shards, quarantine, table


def commit(store: ObjectStore, run_id: str, n_rows: int = 3) -> Manifest:
    shards, quarantine, _ = stage_run(store, run_id, n_rows)
    return commit_version(
        store, dataset=DATASET, staged_shards=shards, staged_quarantine=quarantine, lineage=lineage(run_id),
        stats=Stats(clips_in=n_rows + 1, rows=n_rows, quarantined=1, quarantine_by_reason={"too_short": 1},
                    audio_hours=0.001),
        arrow_schema_b64=schema_to_b64(ROW_SCHEMA), hf_features=hf_features(),
    )


# --------------------------------------------------------------------------------------------
# object store primitives
# --------------------------------------------------------------------------------------------


def test_put_get_list_delete(store: ObjectStore, tmp_path: Path) -> None:
    etag = store.put_bytes("a/b/one.bin", b"1")
    assert etag
    store.put_bytes("a/b/two.bin", b"22")
    store.put_bytes("a/c.txt", b"333")
    store.put_bytes("ab.txt", b"4")
    assert store.get_bytes("a/b/two.bin") == b"22"
    assert store.get_with_etag("a/b/one.bin") == (b"1", etag)
    assert store.exists("a/c.txt") and not store.exists("a/nope")
    assert store.size("a/c.txt") == 3
    assert list(store.list("a/")) == ["a/b/one.bin", "a/b/two.bin", "a/c.txt"]
    assert list(store.list("a")) == ["a/b/one.bin", "a/b/two.bin", "a/c.txt", "ab.txt"]
    assert list(store.list("a/b/t")) == ["a/b/two.bin"]
    assert list(store.list("zzz/")) == []

    store.copy("a/c.txt", "x/copied.txt")
    assert store.get_bytes("x/copied.txt") == b"333"
    src = tmp_path / "up.bin"
    src.write_bytes(b"uploaded" * 1000)
    store.put_file("x/up.bin", src)
    store.download_file("x/up.bin", tmp_path / "down" / "up.bin")
    assert (tmp_path / "down" / "up.bin").read_bytes() == src.read_bytes()
    assert store.sha256("x/up.bin") == hashlib.sha256(src.read_bytes()).hexdigest()

    store.put_bytes("a/c.txt", b"overwritten")
    assert store.get_bytes("a/c.txt") == b"overwritten"
    store.delete("a/c.txt")
    store.delete("a/c.txt")  # deleting a missing key is fine, as on S3
    assert not store.exists("a/c.txt")
    for call in (store.get_bytes, store.get_with_etag, store.size, store.sha256):
        with pytest.raises(NotFound):
            call("a/c.txt")
    with pytest.raises(NotFound):
        store.copy("a/c.txt", "x/never")
    assert list(store.list("a/")) == ["a/b/one.bin", "a/b/two.bin"]


def test_list_dirs_names_the_folders_right_under_a_prefix(store: ObjectStore) -> None:
    for key in ("a/v0001/manifest.json", "a/data/run/x.parquet", "b/refs/latest.json", "top.json", "ab/c"):
        store.put_bytes(key, b"{}")
    assert list(store.list_dirs("")) == ["a", "ab", "b"]
    assert list(store.list_dirs("a/")) == ["data", "v0001"]
    assert list(store.list_dirs("a/data/")) == ["run"] and list(store.list_dirs("a/data/run/")) == []
    assert list(store.list_dirs("nothing/")) == []
    assert list(store.list_dirs("a/v")) == ["0001"]  # a partial name: what follows it, up to the next `/`


def test_create_only_conflict(store: ObjectStore) -> None:
    store.put_bytes("claims/v0001", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("claims/v0001", b"second", if_none_match=True)
    assert store.get_bytes("claims/v0001") == b"first"
    assert list(store.list("claims/")) == ["claims/v0001"]  # no temp or lock files visible


def test_compare_and_swap(store: ObjectStore) -> None:
    store.put_bytes("refs/latest.json", b"v1")
    data, etag = store.get_with_etag("refs/latest.json")
    assert data == b"v1"
    new_etag = store.put_bytes("refs/latest.json", b"v2", if_match=etag)
    assert new_etag != etag
    with pytest.raises(PreconditionFailed):  # stale etag: someone else moved it
        store.put_bytes("refs/latest.json", b"v3", if_match=etag)
    assert store.get_with_etag("refs/latest.json") == (b"v2", new_etag)
    with pytest.raises(PreconditionFailed):  # CAS on a missing key never creates it
        store.put_bytes("refs/other.json", b"v1", if_match=etag)
    assert not store.exists("refs/other.json")


def test_keys_cannot_escape_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for bad in ("../x", "a/../../x", "/abs", "a//b", "a/", "", ".speechpairs-tmp-1"):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"x")


def test_local_create_only_race(tmp_path: Path) -> None:
    """Eight threads race to create one key: exactly one wins, the content is the winner's."""
    store = LocalStore(tmp_path)
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def go(i: int) -> None:
        barrier.wait()
        try:
            store.put_bytes("k", str(i).encode(), if_none_match=True)
            wins.append(i)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.get_bytes("k") == str(wins[0]).encode()


def test_open_store_roots(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert LocalStore(str(tmp_path)).uri("a/b") == str(tmp_path / "a" / "b")
    with pytest.raises(ValueError):
        open_store("gs://bucket/x")


# --------------------------------------------------------------------------------------------
# the one S3 resolution (storage/s3.py)
# --------------------------------------------------------------------------------------------


def test_s3_resolution_order() -> None:
    """config → AWS_ENDPOINT_URL_S3 → AWS_ENDPOINT_URL → profile → AWS; region likewise; auto
    addressing becomes path for a custom endpoint and virtual for AWS."""
    env = {"AWS_ENDPOINT_URL": "http://global:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2/",
           "AWS_REGION": "eu-west-3", "AWS_DEFAULT_REGION": "ap-south-1"}
    profile = ProfileDefaults(endpoint_url="http://profile:3", region="ca-central-1")
    cfg = S3Config(endpoint_url="http://configured:4", region="us-west-2")
    s = resolve_s3(cfg, environ=env, profile=profile)
    assert (s.endpoint_url, s.region, s.addressing_style, s.endpoint_from) == (
        "http://configured:4", "us-west-2", "path", "s3.endpoint_url")
    s = resolve_s3(None, environ=env, profile=profile)
    assert (s.endpoint_url, s.region, s.endpoint_from) == ("http://s3only:2", "eu-west-3", "AWS_ENDPOINT_URL_S3")
    s = resolve_s3(None, environ={"AWS_ENDPOINT_URL": "http://global:1", "AWS_DEFAULT_REGION": "ap-south-1"},
                   profile=profile)
    assert (s.endpoint_url, s.region, s.endpoint_from) == ("http://global:1", "ap-south-1", "AWS_ENDPOINT_URL")
    s = resolve_s3(None, environ={}, profile=profile)
    assert (s.endpoint_url, s.region, s.endpoint_from) == ("http://profile:3", "ca-central-1", "AWS profile")
    s = resolve_s3(None, environ={})
    assert (s.endpoint_url, s.region, s.addressing_style) == (None, "us-east-1", "virtual")
    # AWS_IGNORE_CONFIGURED_ENDPOINT_URLS (as boto3): environment and profile endpoints are skipped.
    s = resolve_s3(None, environ={**env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}, profile=profile)
    assert s.endpoint_url is None and s.addressing_style == "virtual"
    # explicit addressing is kept; a bare host gets https; resolved settings are a fixed point.
    s = resolve_s3(S3Config(endpoint_url="minio.local:9000", addressing_style="virtual"), environ={})
    assert (s.endpoint_url, s.addressing_style) == ("https://minio.local:9000", "virtual")
    assert resolve_s3(s) is s and resolve_s3(s.as_config(), environ=env) == s.model_copy(
        update={"endpoint_from": "s3.endpoint_url"})
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL.*http\\(s\\)://host"):
        resolve_s3(None, environ={"AWS_ENDPOINT_URL": "ftp://x"})


def test_s3_clients_get_the_resolved_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3, pyarrow, fsspec and DuckDB get the same endpoint/region/addressing; the AWS profile's
    endpoint_url counts too (boto3 would follow it; pyarrow would not by itself). No connection made."""
    import pyarrow.fs as pafs

    from storage.s3 import S3Access

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = eu-north-1\nendpoint_url = http://127.0.0.1:9/\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    access = S3Access()
    assert (access.settings.endpoint_url, access.settings.region, access.settings.addressing_style) == (
        "http://127.0.0.1:9", "eu-north-1", "path")
    client = access.client()
    assert client.meta.endpoint_url == "http://127.0.0.1:9" and client.meta.region_name == "eu-north-1"
    assert client.meta.config.s3["addressing_style"] == "path"
    fs = access.arrow_filesystem()
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "eu-north-1"
    state = fs.__reduce__()[1][0]
    assert (state["endpoint_override"], state["scheme"], state["force_virtual_addressing"]) == (
        "127.0.0.1:9", "http", False)
    assert state["access_key"] is None  # env keys: pyarrow reads them itself, none handed over
    assert access.fsspec_options() == {"client_kwargs": {"region_name": "eu-north-1",
                                                         "endpoint_url": "http://127.0.0.1:9"},
                                       "config_kwargs": {"s3": {"addressing_style": "path"}}}
    secret = access.duckdb_secret()
    assert "ENDPOINT '127.0.0.1:9'" in str(secret) and "not-a-real-secret" not in str(secret) + repr(access)
    assert "SECRET 'not-a-real-secret'" in secret.sql()
    store = open_store("s3://bucket/prefix", S3Config(region="us-west-1"))
    assert isinstance(store, S3Store)
    assert (store.settings.endpoint_url, store.settings.region) == ("http://127.0.0.1:9", "us-west-1")
    assert store.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert store.arrow_fs()[1] == "bucket/prefix"


# --------------------------------------------------------------------------------------------
# shards and markers
# --------------------------------------------------------------------------------------------


def test_shard_and_marker(store: ObjectStore) -> None:
    table = rows_to_table(make_rows(2))
    info = write_parquet_shard(store, "st/shard.parquet", table)
    assert info.path == "st/shard.parquet" and info.rows == 2
    data = store.get_bytes("st/shard.parquet")
    assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    back = pq.read_table(pa.BufferReader(data))
    assert back.schema.equals(ROW_SCHEMA, check_metadata=True)
    assert back.equals(table)

    assert read_marker(store, "st/marker.json") is None
    write_marker(store, "st/marker.json", {"index": 0, "rows": 2})
    assert read_marker(store, "st/marker.json") == {"index": 0, "rows": 2}
    store.put_bytes("st/broken.json", b"{not json")
    assert read_marker(store, "st/broken.json") is None


# --------------------------------------------------------------------------------------------
# versions
# --------------------------------------------------------------------------------------------


def test_commit_read_resolve_and_verify(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(VersionNotFound):
        resolve_version(store, DATASET)
    assert list_versions(store, DATASET) == []

    shards, quarantine, table = stage_run(store, "run-1")
    m1 = commit_version(
        store, dataset=DATASET, staged_shards=shards, staged_quarantine=quarantine, lineage=lineage("run-1"),
        stats=Stats(clips_in=4, rows=3, quarantined=1, quarantine_by_reason={"too_short": 1}),
        arrow_schema_b64=schema_to_b64(ROW_SCHEMA), hf_features=hf_features(),
    )
    assert m1.lineage.version == "v0001" and m1.lineage.parent is None and m1.lineage.dataset == DATASET
    assert [s.path for s in m1.shards] == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert [s.path for s in m1.quarantine] == ["quarantine/part-00000.parquet"]
    assert resolve_version(store, DATASET) == "v0001"
    assert resolve_version(store, DATASET, "v0001") == "v0001"
    with pytest.raises(VersionNotFound):
        resolve_version(store, DATASET, "v0002")
    assert read_manifest(store, DATASET, "v0001") == m1

    # Every committed object re-verifies against the manifest's sha256 and size.
    for shard in [*m1.shards, *m1.quarantine]:
        local = tmp_path / "dl" / shard.path
        store.download_file(f"{DATASET}/v0001/{shard.path}", local)
        assert hashlib.sha256(local.read_bytes()).hexdigest() == shard.sha256
        assert local.stat().st_size == shard.bytes

    # Streaming reads through pyarrow's filesystem (LocalFileSystem or S3FileSystem).
    fs, base = store.arrow_fs()
    parts = [pq.read_table(f"{base}/{DATASET}/v0001/{s.path}", filesystem=fs) for s in m1.shards]
    assert pa.concat_tables(parts).equals(table)
    assert parts[0].schema.equals(ROW_SCHEMA, check_metadata=True)
    pf = pq.ParquetFile(fs.open_input_file(f"{base}/{DATASET}/v0001/{m1.quarantine[0].path}"))
    assert pf.schema_arrow.equals(QUARANTINE_SCHEMA) and pf.metadata.num_rows == 1

    m2 = commit(store, "run-2", n_rows=2)
    assert (m2.lineage.version, m2.lineage.parent) == ("v0002", "v0001")
    assert resolve_version(store, DATASET) == "v0002"
    assert list_versions(store, DATASET) == ["v0001", "v0002"]
    assert read_manifest(store, DATASET, "v0001") == m1  # immutable

    # Tags are refs too; `latest` never moves backwards.
    set_ref(store, DATASET, "v0001", "stable", only_forward=False)
    assert resolve_version(store, DATASET, "stable") == "v0001"
    assert set_ref(store, DATASET, "v0001") is False
    assert resolve_version(store, DATASET) == "v0002"

    # The reader API over the same root.
    root = store.root
    assert open_manifest(f"{root}/{DATASET}", _s3_cfg(store)) == m2
    assert open_manifest(f"{root}/{DATASET}@v0001", _s3_cfg(store)) == m1
    assert open_manifest(f"{root}/{DATASET}@stable", _s3_cfg(store)) == m1


def _s3_cfg(store: ObjectStore) -> S3Config | None:
    return store.config if isinstance(store, S3Store) else None


def test_failure_before_manifest_leaves_nothing_visible(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    m1 = commit(store, "run-1")
    shards, quarantine, _ = stage_run(store, "run-2")
    real_put = store.put_bytes

    def failing_put(key: str, data: bytes, **kw: object) -> str:
        if key.endswith("/manifest.json"):
            raise ConnectionError("injected failure after the copies, before the manifest")
        return real_put(key, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "put_bytes", failing_put)
    with pytest.raises(ConnectionError):
        commit_version(store, dataset=DATASET, staged_shards=shards, staged_quarantine=quarantine,
                       lineage=lineage("run-2"), stats=Stats(clips_in=4, rows=3, quarantined=1),
                       arrow_schema_b64=schema_to_b64(ROW_SCHEMA), hf_features=hf_features())
    assert store.exists(f"{DATASET}/v0002/data/train-00000-of-00002.parquet")  # the copies did happen…
    assert resolve_version(store, DATASET) == "v0001"  # …but no version became visible
    assert list_versions(store, DATASET) == ["v0001"]
    with pytest.raises(VersionNotFound):
        resolve_version(store, DATASET, "v0002")
    monkeypatch.undo()

    # The abandoned prefix keeps its claim, so the next commit takes the next free number.
    m3 = commit(store, "run-3")
    assert (m3.lineage.version, m3.lineage.parent) == ("v0003", m1.lineage.version)
    assert list_versions(store, DATASET) == ["v0001", "v0003"]


def test_commit_rejects_corrupt_copy(store: ObjectStore) -> None:
    shards, quarantine, _ = stage_run(store, "run-1")
    bad = [shards[0].model_copy(update={"sha256": "0" * 64}), shards[1]]
    with pytest.raises(CommitError, match="does not verify"):
        commit_version(store, dataset=DATASET, staged_shards=bad, staged_quarantine=quarantine,
                       lineage=lineage("run-1"), stats=Stats(clips_in=4, rows=3, quarantined=1),
                       arrow_schema_b64=schema_to_b64(ROW_SCHEMA), hf_features=hf_features())
    assert list_versions(store, DATASET) == []


def test_commit_rejects_incomplete_lineage(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="lineage"):
        commit_version(store, dataset=DATASET, staged_shards=[], staged_quarantine=[], lineage={"run_id": "r"},
                       stats=Stats(clips_in=0, rows=0, quarantined=0), arrow_schema_b64="", hf_features={})
    assert list(store.list(f"{DATASET}/")) == []  # nothing claimed


def test_concurrent_commits_get_distinct_versions(store: ObjectStore) -> None:
    staged = {f"run-{i}": stage_run(store, f"run-{i}", n_rows=2) for i in range(3)}

    def go(run_id: str) -> Manifest:
        shards, quarantine, _ = staged[run_id]
        return commit_version(
            store, dataset=DATASET, staged_shards=shards, staged_quarantine=quarantine,
            lineage=lineage(run_id), stats=Stats(clips_in=3, rows=2, quarantined=1),
            arrow_schema_b64=schema_to_b64(ROW_SCHEMA), hf_features=hf_features())

    with ThreadPoolExecutor(len(staged)) as pool:
        results = dict(zip(staged, pool.map(go, staged), strict=True))
    versions = sorted(m.lineage.version for m in results.values())
    assert versions == ["v0001", "v0002", "v0003"]
    assert resolve_version(store, DATASET) == "v0003"
    for m in results.values():
        assert read_manifest(store, DATASET, m.lineage.version).lineage.run_id == m.lineage.run_id


# --------------------------------------------------------------------------------------------
# consumers
# --------------------------------------------------------------------------------------------


def test_datasets_decodes_committed_audio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    store = LocalStore(tmp_path / "root")
    manifest = commit(store, "run-1", n_rows=3)
    path = store.uri(f"{DATASET}/{manifest.lineage.version}/{manifest.shards[0].path}")
    ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["audio"], datasets.Audio)
    assert ds.num_rows == 2 and ds[0]["id"] == "clip-000"
    audio = ds[1]["audio"]
    samples = audio.get_all_samples()
    assert samples.sample_rate == SR
    assert samples.data.shape[-1] == int(SR * 0.5)
    assert ds[1]["labels"] == {"speaker": "s1"}


def test_parse_dataset_uri() -> None:
    assert parse_dataset_uri("./data/demo@v0001") == ("./data", "demo", "v0001")
    assert parse_dataset_uri("./data/demo") == ("./data", "demo", "latest")
    assert parse_dataset_uri("s3://bucket/prefix/demo") == ("s3://bucket/prefix", "demo", "latest")
    assert parse_dataset_uri("s3://bucket/demo@stable") == ("s3://bucket", "demo", "stable")
    assert parse_dataset_uri("/abs/root/demo/") == ("/abs/root", "demo", "latest")
    for bad in ("demo", "s3://bucket", "./data/demo@", "./data/@v1", "./data/de mo"):
        with pytest.raises(ValueError):
            parse_dataset_uri(bad)


def test_manifest_summary(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    m = commit(store, "run-7")
    text = manifest_summary(m)
    for needle in ("dataset demo", "version v0001", "rows 3", "too_short: 1", "audio 0.001 h",
                   "data/train-00000-of-00002.parquet", "config cfg123", "bins bins-1", "llm=template",
                   "quarantine/part-00000.parquet", "run run-7"):
        assert needle in text, needle


@pytest.mark.s3
def test_s3_multipart_upload_copy_and_verify(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    """put_file above the threshold goes up in parts; copy and the streamed sha256 still agree."""
    cfg = S3Config(endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region, addressing_style="path")
    store = S3Store(seaweedfs.root(f"t-{uuid.uuid4().hex[:12]}"), cfg, multipart_bytes=5 * 1024**2)
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(11 * 1024**2 + 123))
    store.put_file("big/one.bin", big)
    _, etag = store.get_with_etag("big/one.bin")
    assert etag.strip('"').endswith("-3")  # three parts: a multipart object
    store.copy("big/one.bin", "big/two.bin")
    want = hashlib.sha256(big.read_bytes()).hexdigest()
    assert store.sha256("big/one.bin") == store.sha256("big/two.bin") == want
    assert store.size("big/two.bin") == big.stat().st_size


@pytest.mark.s3
def test_s3_secrets_stay_out_of_errors_and_manifests(seaweedfs: SeaweedS3) -> None:
    store = _s3_store(seaweedfs)
    manifest = commit(store, "run-1", n_rows=2)
    with pytest.raises(NotFound) as err:
        store.get_bytes("missing/key")
    texts = [repr(store), str(err.value), manifest.model_dump_json(), json.dumps(store.config.model_dump())]
    for text in texts:
        assert seaweedfs.secret_key not in text and seaweedfs.access_key not in text


def test_streaming_shard_writer(store: ObjectStore) -> None:
    from storage.shards import ParquetShardWriter

    key = "streamed/_staging/r/shards/train-00000.parquet"
    with ParquetShardWriter(store, key, ROW_SCHEMA) as writer:
        for i in range(3):
            writer.write(rows_to_table(make_rows(2, run_id=f"r{i}")))
        info = writer.close()
    assert info is not None and info.rows == 6
    data = store.get_bytes(key)
    assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.bytes
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == 3
    with ParquetShardWriter(store, "streamed/empty.parquet", ROW_SCHEMA) as writer:
        assert writer.close() is None
    assert not store.exists("streamed/empty.parquet")
    with pytest.raises(RuntimeError), ParquetShardWriter(store, "streamed/failed.parquet", ROW_SCHEMA) as writer:
        writer.write(rows_to_table(make_rows(2)))
        raise RuntimeError("shard died halfway")
    assert not store.exists("streamed/failed.parquet")
