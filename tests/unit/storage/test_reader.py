"""Consumer API: open_dataset, verify, streaming reads, HF `datasets`, and the torch loader.

Versions are made by the real pipeline on the sample corpus (tests/support/datasets_support.py), on a
local directory and on a real SeaweedFS S3 server.
"""

from __future__ import annotations

import io
import multiprocessing
import pickle
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from flows.cli import main
from schemas.config import S3Config
from storage.objectstore import ObjectStore
from storage.reader import DatasetHandle, open_dataset
from storage.verify import verify_manifest, verify_version
from storage.versions import VersionNotFound, set_ref
from tests.support.datasets_support import REPO, make_version
from tests.support.seaweedfs import SeaweedS3
from tests.support.stored import stored_rows

DATASET = "demo"
SR = 16_000


@dataclass
class Root:
    """Where versions go: a local directory or an S3 prefix (with the config to reach it)."""

    uri: str
    s3: S3Config | None = None
    endpoint: str | None = None
    region: str | None = None

    def make(self, workdir: Path, *, repeat: int = 1, shard_size: int = 4, dataset: str = DATASET) -> DatasetHandle:
        manifest = make_version(self.uri, dataset, workdir=workdir, repeat=repeat, shard_size=shard_size,
                                s3_endpoint=self.endpoint, s3_region=self.region)
        return open_dataset(f"{self.uri}/{dataset}", manifest.lineage.version, s3=self.s3)


def _s3_root(server: SeaweedS3) -> Root:
    return Root(server.root(f"reader-{uuid.uuid4().hex[:10]}"),
                S3Config(endpoint_url=server.endpoint_url, region=server.region, addressing_style="path"),
                server.endpoint_url, server.region)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Root:
    """A fresh, empty root per test: local directory or S3 prefix."""
    if request.param == "local":
        return Root(str(tmp_path / "root"))
    return _s3_root(request.getfixturevalue("seaweedfs"))


# One read-only version of 30 rows in 8 shards per backend, shared by the read-only tests.
@pytest.fixture(scope="module")
def local_v30(tmp_path_factory: pytest.TempPathFactory) -> DatasetHandle:
    work = tmp_path_factory.mktemp("local_v30")
    return Root(str(work / "root")).make(work, repeat=3, shard_size=4)


@pytest.fixture(scope="module")
def s3_v30(tmp_path_factory: pytest.TempPathFactory, seaweedfs_server: SeaweedS3) -> DatasetHandle:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", seaweedfs_server.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs_server.secret_key)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        return _s3_root(seaweedfs_server).make(tmp_path_factory.mktemp("s3_v30"), repeat=3, shard_size=4)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def v30(request: pytest.FixtureRequest) -> DatasetHandle:
    """The shared 30-row version on each backend (S3 tests get the AWS_* variables set)."""
    if request.param == "local":
        return request.getfixturevalue("local_v30")  # type: ignore[no-any-return]
    request.getfixturevalue("seaweedfs")
    return request.getfixturevalue("s3_v30")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# open_dataset: latest, versions, tags
# --------------------------------------------------------------------------------------------


def test_open_dataset_latest_version_and_tag(root: Root, tmp_path: Path) -> None:
    v1 = root.make(tmp_path, repeat=1)
    v2 = root.make(tmp_path, repeat=2)
    assert (v1.version, v2.version) == ("v0001", "v0002")
    base = f"{root.uri}/{DATASET}"

    latest = open_dataset(base, s3=root.s3)
    assert latest.version == "v0002" and latest.num_rows == latest.manifest.stats.rows == 20
    assert open_dataset(f"{base}@latest", s3=root.s3).version == "v0002"
    assert open_dataset(f"{base}@v0001", s3=root.s3).num_rows == 10
    assert open_dataset(base, "v0001", s3=root.s3).version == "v0001"
    assert open_dataset(f"{base}@v0002", version="v0001", s3=root.s3).version == "v0001"  # kwarg wins

    set_ref(latest.store, DATASET, "v0001", "stable", only_forward=False)
    assert open_dataset(f"{base}@stable", s3=root.s3).version == "v0001"
    assert open_dataset(base, version="stable", s3=root.s3).manifest == v1.manifest
    assert open_dataset(base, version="latest", s3=root.s3).version == "v0002"

    with pytest.raises(VersionNotFound):
        open_dataset(f"{base}@no-such-tag", s3=root.s3)
    with pytest.raises(VersionNotFound):
        open_dataset(base, "v0009", s3=root.s3)
    with pytest.raises(VersionNotFound):
        open_dataset(f"{root.uri}/other", s3=root.s3)


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def test_verify_ok(v30: DatasetHandle) -> None:
    report = v30.verify()
    assert report.ok, report.summary()
    assert (report.dataset, report.version, report.shards_checked, report.rows) == (DATASET, v30.version, 8, 30)
    assert verify_version(v30.store, DATASET, v30.version, deep=False).ok
    # The manifest's own arithmetic is checked too.
    lying = v30.manifest.model_copy(update={"stats": v30.manifest.stats.model_copy(update={"rows": 31})})
    problems = verify_manifest(v30.store, lying).problems
    assert [(p.path, p.problem) for p in problems] == [("manifest.json", "stats.rows 31 != sum of shard rows 30")]


def _data_middle(data: bytes) -> int:
    """The middle of a Parquet file's column data, between the leading magic and the footer (a row
    shard without audio bytes is small: its plain middle can be the footer, which reads as unreadable)."""
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    return (4 + footer) // 2


def _flip_middle(data: bytes, n: int = 16) -> bytes:
    mid = _data_middle(data)
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + n]) + data[mid + n:]


def test_verify_names_corrupt_missing_and_foreign_shards(root: Root, tmp_path: Path) -> None:
    handle = root.make(tmp_path, repeat=2, shard_size=4)  # 20 rows, 5 shards
    shards = handle.manifest.shards
    store: ObjectStore = handle.store
    corrupt, missing, foreign = shards[1], shards[2], shards[3]

    key = handle.shard_key(1)
    if root.s3 is None:  # overwrite bytes inside the committed file itself
        path = Path(handle.shard_uris()[1])
        mid = _data_middle(path.read_bytes())
        with open(path, "r+b") as fh:
            fh.seek(mid)
            chunk = fh.read(16)
            fh.seek(mid)
            fh.write(bytes(b ^ 0xFF for b in chunk))
    else:
        store.put_bytes(key, _flip_middle(store.get_bytes(key)))
    store.delete(handle.shard_key(2))
    # Shard 3 replaced by a valid Parquet file with other rows and a column less.
    table = pq.read_table(io.BytesIO(store.get_bytes(handle.shard_key(0)))).drop_columns(["response"])
    buf = io.BytesIO()
    pq.write_table(table.slice(0, 3), buf)
    store.put_bytes(handle.shard_key(3), buf.getvalue())

    report = open_dataset(f"{root.uri}/{DATASET}@{handle.version}", s3=root.s3).verify()
    assert not report.ok
    by_path: dict[str, list[str]] = {}
    for p in report.problems:
        by_path.setdefault(p.path, []).append(p.problem)
    assert set(by_path) == {corrupt.path, missing.path, foreign.path}, report.summary()
    assert by_path[corrupt.path] == [f"sha256 mismatch (expected {corrupt.sha256}, got {store.sha256(key)})"]
    assert by_path[missing.path] == ["missing"]
    problems = " | ".join(by_path[foreign.path])
    assert "size" in problems and "rows 3 != manifest 4" in problems and "schema differs" in problems
    assert "response" in problems
    assert verify_version(store, DATASET, handle.version, deep=False).problems != []


# --------------------------------------------------------------------------------------------
# streaming reads
# --------------------------------------------------------------------------------------------


def test_iter_batches_columns_and_to_arrow(v30: DatasetHandle, tmp_path: Path) -> None:
    batches = list(v30.iter_batches(columns=["id", "response"], batch_size=3))
    assert all(b.schema.names == ["id", "response"] for b in batches)
    assert all(0 < b.num_rows <= 3 for b in batches)
    ids = [i for b in batches for i in b.column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 30
    assert all(isinstance(r, str) and r for b in batches for r in b.column("response").to_pylist())

    table = v30.to_arrow()
    assert table.num_rows == v30.manifest.stats.rows == 30
    assert table.schema.equals(v30.schema) and table.column("id").to_pylist() == ids  # manifest order
    assert v30.to_arrow(columns=["id"]).column_names == ["id"]
    assert sum(b.num_rows for b in v30.iter_batches()) == 30

    uris = v30.shard_uris()
    assert len(uris) == 8
    # Audio stored once: `datasets` gets local files with the audio joined in (the shards lack the bytes).
    assert v30.hf_data_files(materialize_to=tmp_path) == [str(tmp_path / f"{s.sha256}.parquet") for s in v30.shards]
    if v30.store.root.startswith("s3://"):
        assert all(u.startswith(f"{v30.store.root}/{DATASET}/data/") for u in uris)
        assert v30.hf_storage_options()["client_kwargs"]["endpoint_url"].startswith("http://127.0.0.1:")
    else:
        assert all(Path(u).is_absolute() and Path(u).is_file() for u in uris)
        assert v30.hf_storage_options() == {}
    with pytest.raises(ValueError, match="nope"):
        list(v30.iter_batches(columns=["id", "nope"]))


def test_iter_shard_row_ranges(local_v30: DatasetHandle) -> None:
    full = local_v30.to_arrow(["id"]).column("id").to_pylist()
    first = [i for b in local_v30.iter_shard(0, ["id"], 1, start=1, stop=3) for i in b.column("id").to_pylist()]
    assert first == full[1:3]
    assert list(local_v30.iter_shard(0, ["id"], start=4)) == []


def test_handle_pickles_without_its_connection(local_v30: DatasetHandle) -> None:
    copy = pickle.loads(pickle.dumps(local_v30))
    assert copy.manifest == local_v30.manifest and copy.uri == local_v30.uri
    assert copy.to_arrow(["id"]).equals(local_v30.to_arrow(["id"]))


def test_storage_does_not_import_torch() -> None:
    code = ("import sys, storage, storage.reader, storage.verify; "
            "assert 'torch' not in sys.modules, 'storage imported torch'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------


def _decoded(audio: Any) -> tuple[np.ndarray, int]:
    """(mono samples, rate) of a decoded HF `Audio` value (a dict before datasets 4, then a torchcodec decoder)."""
    if isinstance(audio, dict):
        return np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
    samples = audio.get_all_samples()
    return samples.data.numpy()[0], int(samples.sample_rate)


def test_hf_load_dataset_decodes_audio(local_v30: DatasetHandle, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Audio stored once: hf_data_files() materialises the shards joined (under SPEECHPAIRS_HOME by
    default) and `datasets` decodes exactly the samples of the audio files' bytes."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    home = tmp_path / "home"
    monkeypatch.setenv("SPEECHPAIRS_HOME", str(home))
    manifest = local_v30.manifest
    assert all(s.audio is not None for s in manifest.shards)  # what the pipeline writes now
    files = local_v30.hf_data_files()
    assert files == [str(home / "materialized" / DATASET / local_v30.version / f"{s.sha256}.parquet")
                     for s in manifest.shards]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 30
    assert type(ds.features["audio"]).__name__ == "Audio"
    oracle = stored_rows(local_v30.store, manifest)
    assert ds["id"] == list(oracle)  # manifest order, every row once
    for row in ds:
        assert isinstance(row["labels"], dict) and row["labels"]
        got, rate = _decoded(row["audio"])
        want, want_rate = sf.read(io.BytesIO(oracle[row["id"]]["audio"]["bytes"]), dtype="float32")
        assert rate == want_rate == SR and np.array_equal(got, want), row["id"]
    raw = ds.cast_column("audio", datasets.Audio(decode=False))
    assert [r["audio"]["bytes"] for r in raw] == [r["audio"]["bytes"] for r in oracle.values()]


# --------------------------------------------------------------------------------------------
# torch IterableDataset
# --------------------------------------------------------------------------------------------


def test_assign_pieces_partitions_every_row() -> None:
    pytest.importorskip("torch")
    from storage.torch_dataset import assign_pieces, shard_order

    for shard_rows in ([4, 4, 4, 2], [30], [0, 5, 7], [1] * 9, [100, 3]):
        for consumers in (1, 2, 3, 4, 7, 12):
            for split in ("auto", "shards", "rows"):
                order = shard_order(len(shard_rows), seed=3, epoch=1)
                seen: Counter[tuple[int, int]] = Counter()
                for c in range(consumers):
                    for s, a, b in assign_pieces(shard_rows, order, consumers, c, split):  # type: ignore[arg-type]
                        seen.update((s, r) for r in range(a, b))
                expected = {(s, r) for s, n in enumerate(shard_rows) for r in range(n)}
                assert set(seen) == expected and all(v == 1 for v in seen.values()), (shard_rows, consumers, split)
    # rows: contiguous, equal ±1 shares
    sizes = [sum(b - a for _, a, b in assign_pieces([30], [0], 4, c)) for c in range(4)]
    assert sizes == [7, 8, 7, 8]


def _loader_ids(handle: DatasetHandle, *, world_size: int, workers: int, epoch: int = 0,
                **kw: Any) -> list[list[str]]:
    """The ids each rank's DataLoader yields (fork workers), one list per rank."""
    torch_data = pytest.importorskip("torch.utils.data")
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    per_rank = []
    for rank in range(world_size):
        ds = handle.torch_dataset(world_size=world_size, rank=rank, columns=["id"], decode_audio=False, **kw)
        ds.set_epoch(epoch)
        loader = torch_data.DataLoader(ds, batch_size=None, num_workers=workers, timeout=120,
                                       multiprocessing_context=multiprocessing.get_context("fork"))
        per_rank.append([row["id"] for row in loader])
    return per_rank


def _version_ids(handle: DatasetHandle) -> list[str]:
    return sorted(handle.to_arrow(["id"]).column("id").to_pylist())


@pytest.mark.parametrize("split", ["auto", "rows"])
def test_torch_two_ranks_two_workers_cover_version_exactly(v30: DatasetHandle, split: str) -> None:
    per_rank = _loader_ids(v30, world_size=2, workers=2, split=split)
    union = [i for ids in per_rank for i in ids]
    assert sorted(union) == _version_ids(v30)  # no duplicate, no missing row
    assert all(ids for ids in per_rank)
    if split == "rows":
        assert sorted(len(ids) for ids in per_rank) == [15, 15]


@pytest.mark.parametrize("shard_size", [100, 10])  # 1 shard, 3 shards: fewer shards than 4 consumers
def test_torch_fewer_shards_than_consumers(tmp_path: Path, shard_size: int) -> None:
    handle = Root(str(tmp_path / "root")).make(tmp_path, repeat=3, shard_size=shard_size)
    assert len(handle.manifest.shards) == -(-30 // shard_size) < 4
    per_rank = _loader_ids(handle, world_size=2, workers=2, epoch=1)
    assert sorted(i for ids in per_rank for i in ids) == _version_ids(handle)
    assert sorted(len(ids) for ids in per_rank) == [15, 15]


def test_torch_shard_order_per_epoch(local_v30: DatasetHandle) -> None:
    pytest.importorskip("torch")
    r0 = local_v30.torch_dataset(world_size=2, rank=0, seed=7)
    r1 = local_v30.torch_dataset(world_size=2, rank=1, seed=7)
    for epoch in (0, 1):
        r0.set_epoch(epoch)
        r1.set_epoch(epoch)
        assert r0.shard_order() == r1.shard_order()
        assert sorted(r0.shard_order()) == list(range(8))
    assert r0.shard_order(0) != r0.shard_order(1)
    assert local_v30.torch_dataset(seed=8).shard_order(0) != r0.shard_order(0)
    assert local_v30.torch_dataset(shuffle_shards=False).shard_order(5) == list(range(8))

    # The stream itself: same rows, another order, in each epoch (one process).
    single = local_v30.torch_dataset(columns=["id"], decode_audio=False, seed=7)
    single.set_epoch(0)
    e0 = [r["id"] for r in single]
    single.set_epoch(1)
    e1 = [r["id"] for r in single]
    assert sorted(e0) == sorted(e1) == _version_ids(local_v30) and e0 != e1


def test_torch_decodes_audio(local_v30: DatasetHandle) -> None:
    pytest.importorskip("torch")
    rows = list(local_v30.torch_dataset(shuffle_shards=False))
    assert len(rows) == 30
    for row in rows:
        arr = row["audio_array"]
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.ndim == 1
        assert abs(len(arr) - row["duration_s"] * SR) <= SR // 100
        assert row["sampling_rate"] == SR
        assert isinstance(row["labels"], dict) and isinstance(row["attributes"], dict)
        assert isinstance(row["provenance"]["extractor_versions"], dict)
    assert rows[0]["audio"]["bytes"]  # all columns by default, audio bytes included
    some = next(iter(local_v30.torch_dataset(columns=["id", "duration_s"])))
    assert set(some) == {"id", "duration_s", "audio_array", "sampling_rate"}
    plain = next(iter(local_v30.torch_dataset(columns=["id"], decode_audio=False)))
    assert set(plain) == {"id"}
    with pytest.raises(ValueError):
        local_v30.torch_dataset(world_size=2, rank=2)


def test_decode_audio_resamples_and_downmixes() -> None:
    pytest.importorskip("torch")
    from storage.torch_dataset import decode_audio_bytes

    t = np.arange(8000, dtype=np.float32) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1) * 0.5
    buf = io.BytesIO()
    sf.write(buf, stereo, 8000, format="WAV", subtype="PCM_16")
    out = decode_audio_bytes(buf.getvalue(), SR)
    assert out.dtype == np.float32 and out.ndim == 1 and abs(len(out) - SR) <= 2
    assert 0.2 < float(np.abs(out).max()) < 0.3  # mean of a 0.5 sine and silence


@pytest.mark.s3
def test_torch_over_s3_two_ranks_two_workers(seaweedfs: SeaweedS3, s3_v30: DatasetHandle) -> None:
    per_rank = _loader_ids(s3_v30, world_size=2, workers=2)
    assert sorted(i for ids in per_rank for i in ids) == _version_ids(s3_v30)
    row = next(iter(s3_v30.torch_dataset(columns=["id", "duration_s"])))
    assert abs(len(row["audio_array"]) - row["duration_s"] * SR) <= SR // 100


def test_duckdb_readme_example(local_v30: DatasetHandle, tmp_path: Path) -> None:
    """The README's DuckDB queries: text columns over the manifest's shard files as they are; audio
    bytes (stored once, in audio files) over the materialised files."""
    duckdb = pytest.importorskip("duckdb")
    files = local_v30.shard_uris()
    con = duckdb.connect()
    rows = con.sql(f"""
        SELECT attributes->>'Gender' AS gender, count(*) AS rows, round(sum(duration_s) / 3600, 3) AS hours
        FROM read_parquet({files!r}) GROUP BY gender ORDER BY rows DESC""").fetchall()
    assert {g: n for g, n, _ in rows} == {"Male": 27, "Female": 3}
    noise = con.sql(f"""SELECT attributes->>'$."Noise level"' FROM read_parquet({files!r})""").fetchall()
    assert len(noise) == 30 and all(n[0] for n in noise)
    # The row shards keep only the clip's name: their bytes live in the audio files.
    assert con.sql(f"SELECT count(audio.bytes), count(audio.path) FROM read_parquet({files!r})").fetchall() == [
        (0, 30)]
    assert main(["datasets", "materialize", local_v30.uri, "--to", str(tmp_path / "m"), "--no-progress"]) == 0
    joined = dict(con.sql(f"SELECT id, audio.bytes FROM read_parquet('{tmp_path}/m/*.parquet')").fetchall())
    oracle = stored_rows(local_v30.store, local_v30.manifest)
    assert joined == {k: r["audio"]["bytes"] for k, r in oracle.items()}
