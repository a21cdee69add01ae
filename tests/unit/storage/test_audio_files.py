"""The audio join (audio stored once): row-shard batches get their bytes from the audio file by id,
in the batch's order, across row groups, for a subset of the file's ids; a row's own bytes win, and
an id the file lacks is an error naming the file and the id."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from schemas.arrow import AUDIO_TYPE
from storage.audio_files import AudioLookup, AudioLookupError, fill_audio


def _audio_file(path: Path, n: int) -> dict[str, bytes]:
    data = {f"c/{i:04d}": random.Random(i).randbytes(50 + i) for i in range(n)}
    table = pa.table({"id": list(data), "audio": pa.array([{"bytes": b, "path": f"{k[2:]}.flac"}
                                                           for k, b in data.items()], AUDIO_TYPE)})
    pq.write_table(table, path, row_group_size=100)
    return data


def _shard(ids: list[str], own: dict[str, bytes] | None = None) -> pa.Table:
    own = own or {}
    return pa.table({"id": ids, "audio": pa.array([{"bytes": own.get(i), "path": f"{i[2:]}.flac"} for i in ids],
                                                  AUDIO_TYPE), "n": list(range(len(ids)))})


def test_fill_joins_by_id_across_row_groups_in_batch_order(tmp_path: Path) -> None:
    data = _audio_file(tmp_path / "a.parquet", 250)
    ids = sorted(random.Random(1).sample(list(data), 120))  # a subset, in file order
    ids[5], ids[90] = ids[90], ids[5]  # and one pair out of order
    with AudioLookup(pafs.LocalFileSystem(), str(tmp_path / "a.parquet")) as lookup:
        for start in range(0, len(ids), 37):
            batch = _shard(ids[start:start + 37]).to_batches()[0]
            filled = fill_audio(batch, lookup)
            assert filled.schema == batch.schema and filled.column(2) == batch.column(2)
            got = filled.column(1).to_pylist()
            assert [a["bytes"] for a in got] == [data[i] for i in ids[start:start + 37]]
            assert [a["path"] for a in got] == [f"{i[2:]}.flac" for i in ids[start:start + 37]]


def test_own_bytes_win_and_a_missing_id_is_named(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    data = _audio_file(path, 10)
    lookup = AudioLookup(pafs.LocalFileSystem(), str(path), "s3://b/ds/audio/a.parquet")
    table = fill_audio(_shard(["c/0001", "c/0002"], own={"c/0002": b"mine"}), lookup)
    assert [a["bytes"] for a in table.column("audio").to_pylist()] == [data["c/0001"], b"mine"]
    with pytest.raises(AudioLookupError, match=r"s3://b/ds/audio/a.parquet has no clip 'c/0099'"):
        fill_audio(_shard(["c/0001", "c/0099"]), lookup)
    lookup.close()
