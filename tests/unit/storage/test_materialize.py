"""storage/materialize.py and `speechpairs datasets materialize`: self-contained shards of a version
whose audio is stored once (joined bytes equal the audio files', the exact row schema, row groups of
100), reused by a rerun without a write, and a corrupt input named.

The version comes from the real stages on the 10-clip sample corpus (tests/support/datasets_support.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from schemas.arrow import AUDIO_TYPE
from storage.materialize import RECORD_DIR, MaterializeError, default_dir, materialize_version, write_joined
from storage.objectstore import LocalStore
from storage.reader import DatasetHandle, open_dataset
from storage.versions import file_key
from tests.support.datasets_support import make_version
from tests.support.stored import stored_rows

DS = "demo"


@pytest.fixture(scope="module")
def handle(tmp_path_factory: pytest.TempPathFactory) -> DatasetHandle:
    """demo v0001: 10 rows in 3 shards, audio in audio files. Read-only: copy the root to change it."""
    work = tmp_path_factory.mktemp("materialize")
    make_version(str(work / "root"), DS, workdir=work)
    ds = open_dataset(f"{work / 'root'}/{DS}@v0001")
    assert len(ds.shards) == 3 and all(s.audio is not None for s in ds.shards)
    return ds


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_materialized_files_hold_the_joined_rows_and_a_rerun_writes_nothing(handle: DatasetHandle,
                                                                             tmp_path: Path) -> None:
    dest = tmp_path / "m"
    first = materialize_version(handle.store, handle.manifest, dest)
    assert [f.path for f in first] == [dest / f"{s.sha256}.parquet" for s in handle.shards]
    assert all(f.written for f in first)
    oracle = stored_rows(handle.store, handle.manifest)
    for f, shard in zip(first, handle.shards, strict=True):
        meta = pq.ParquetFile(f.path).metadata
        assert (f.info.rows, f.info.bytes) == (meta.num_rows, f.path.stat().st_size) and f.info.rows == shard.rows
        assert f.info.audio is None
        assert meta.row_group(0).column(0).compression == "ZSTD"
        # Exactly the version's row schema, with its `huggingface` features.
        assert pq.read_schema(f.path).equals(handle.schema, check_metadata=True)
        for row in pq.read_table(f.path).to_pylist():
            assert row == oracle[row["id"]]  # every column, audio bytes from the audio file
    assert pq.read_table([str(f.path) for f in first]).equals(handle.to_arrow())  # the joined reader agrees
    assert sorted(p.name for p in dest.iterdir()) == sorted([RECORD_DIR, *(f.path.name for f in first)])

    stamps = {f.path: f.path.stat().st_mtime_ns for f in first}
    again = materialize_version(handle.store, handle.manifest, dest)
    assert [f.written for f in again] == [False] * 3 and [f.info for f in again] == [f.info for f in first]
    assert {f.path: f.path.stat().st_mtime_ns for f in again} == stamps


def test_a_changed_file_or_stale_record_is_rewritten(handle: DatasetHandle, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    first = materialize_version(handle.store, handle.manifest, dest)
    _flip(first[0].path)  # same size, other bytes
    record = dest / RECORD_DIR / f"{first[2].path.name}.json"
    data = json.loads(record.read_text())
    data["sources"]["audio"] = "0" * 64  # made from another audio file
    record.write_text(json.dumps(data))
    again = materialize_version(handle.store, handle.manifest, dest)
    assert [f.written for f in again] == [True, False, True]
    assert [f.info for f in again] == [f.info for f in first]  # the same bytes again


def test_a_corrupt_audio_file_is_named_and_nothing_is_left(handle: DatasetHandle, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(handle.store.root, root)
    store = LocalStore(root)
    audio = handle.shards[1].audio
    assert audio is not None
    _flip(root / file_key(handle.manifest, audio))
    dest = tmp_path / "m"
    with pytest.raises(MaterializeError, match=f"audio file of shard {handle.shards[1].path}: {audio.path} "
                                               "does not match the manifest"):
        materialize_version(store, handle.manifest, dest)
    assert sorted(p.name for p in dest.glob("*.parquet")) == [f"{handle.shards[0].sha256}.parquet"]
    assert not [p for p in dest.rglob("*") if p.name.endswith(".part") or p.name.startswith(".speechpairs-")]


def test_row_groups_of_100_and_own_bytes_kept(handle: DatasetHandle, tmp_path: Path) -> None:
    """250 rows → row groups 100/100/50 (as storage/shards.py writes); a row's own bytes win."""
    ids = [f"x/{i:03d}" for i in range(250)]
    table = pq.read_table(handle.store.uri(handle.shard_key(0))).take([0] * 250)  # one row, 250 times
    own = pa.array([{"bytes": b"own" if n == 7 else None, "path": f"{i}.flac"} for n, i in enumerate(ids)],
                   type=AUDIO_TYPE)
    for name, values in (("id", pa.array(ids)), ("audio", own)):
        j = table.schema.get_field_index(name)
        table = table.set_column(j, table.schema.field(j), values)
    shard = tmp_path / "shard.parquet"
    pq.write_table(table, shard, row_group_size=64)
    audio = tmp_path / "audio.parquet"
    values = [{"bytes": i.encode(), "path": f"{i}.flac"} for i in reversed(ids)]  # other order, a superset
    pq.write_table(pa.table({"id": [*reversed(ids), "extra"],
                             "audio": pa.array([*values, {"bytes": b"?", "path": None}], type=AUDIO_TYPE)}), audio)
    out = tmp_path / "out.parquet"
    n, size, _ = write_joined(shard, audio, handle.schema, out, name="shard.parquet")
    meta = pq.ParquetFile(out).metadata
    assert (n, size) == (250, out.stat().st_size)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [100, 100, 50]
    got = pq.read_table(out, columns=["id", "audio"]).to_pylist()
    assert [r["id"] for r in got] == ids
    assert [r["audio"]["bytes"] for r in got] == [b"own" if n == 7 else i.encode() for n, i in enumerate(ids)]


def test_cli_prints_written_then_reused(handle: DatasetHandle, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "m"
    assert main(["datasets", "materialize", handle.uri, "--to", str(dest), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in out[:3]] == [["written", str(dest / f"{s.sha256}.parquet")] for s in handle.shards]
    assert out[3] == f"materialized {DS} v0001 in {dest}: 3 written, 0 already there and verified"
    assert main(["datasets", "materialize", handle.uri, "--to", str(dest), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out[:3]] == ["reused"] * 3 and "0 written, 3 already there" in out[3]


def test_hf_data_files_materialize_to_and_the_default_dir(handle: DatasetHandle, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    files = handle.hf_data_files(materialize_to=tmp_path / "here")
    assert files == [str(tmp_path / "here" / f"{s.sha256}.parquet") for s in handle.shards]
    monkeypatch.setenv("SPEECHPAIRS_HOME", str(tmp_path / "home"))
    assert default_dir(DS, "v0002") == tmp_path / "home" / "materialized" / DS / "v0002"
    monkeypatch.delenv("SPEECHPAIRS_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_dir(DS, "v0002") == tmp_path / "user" / ".cache" / "speechpairs" / "materialized" / DS / "v0002"
