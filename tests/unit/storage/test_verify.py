"""verify and audio stored once: each shard's audio file is checked (bytes, Parquet, columns) and
every id of the row shard must be in it; a version from before audio files is checked as before.

Versions are made by the real pipeline on the sample corpus (tests/support/datasets_support.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from schemas.manifest import Manifest
from storage.objectstore import LocalStore
from storage.verify import verify_manifest
from tests.support.compose_support import commit_tables, rows_table
from tests.support.datasets_support import make_version

DATASET = "demo"


@pytest.fixture
def made(tmp_path: Path) -> tuple[LocalStore, Manifest]:
    """A fresh 10-row version in 3 shards, each naming its own audio file."""
    root = tmp_path / "root"
    manifest = make_version(str(root), DATASET, workdir=tmp_path, shard_size=4)
    assert all(s.audio is not None for s in manifest.shards)
    return LocalStore(str(root)), manifest


def _problems(store: LocalStore, manifest: Manifest, deep: bool = True) -> dict[str, list[str]]:
    by_path: dict[str, list[str]] = {}
    for p in verify_manifest(store, manifest, deep=deep).problems:
        by_path.setdefault(p.path, []).append(p.problem)
    return by_path


def test_verify_counts_audio_files(made: tuple[LocalStore, Manifest]) -> None:
    store, manifest = made
    report = verify_manifest(store, manifest)
    assert report.ok, report.summary()
    assert report.audio_files_checked == len({s.audio.path for s in manifest.shards if s.audio}) == 3
    assert "3 audio files" in report.summary()


def test_verify_names_missing_and_corrupt_audio_files_with_the_fix(made: tuple[LocalStore, Manifest]) -> None:
    store, manifest = made
    gone, flipped = manifest.shards[0].audio, manifest.shards[1].audio
    assert gone is not None and flipped is not None
    store.delete(gone.path)
    path = store.base / flipped.path
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # audio bytes: the bulk of an audio file, far from its footer
    path.write_bytes(bytes(data))

    found = _problems(store, manifest)
    assert set(found) == {gone.path, flipped.path}
    index = gone.path.rsplit("-", 1)[0] + ".json"
    expected = (f"missing (audio of {manifest.shards[0].path}); fix: restore it, or delete it and its clip index "
                f"{index} and re-run the version's config.yaml (`speechpairs run --config …`), which measures "
                "those clips again")
    assert found[gone.path] == [expected]
    assert len(found[flipped.path]) == 1 and found[flipped.path][0].startswith("sha256 mismatch")
    assert manifest.shards[1].path in found[flipped.path][0]
    # Shallow: sizes only, so the flipped byte goes unseen; the missing file does not.
    assert set(_problems(store, manifest, deep=False)) == {gone.path}


def test_verify_names_a_shard_whose_ids_its_audio_file_lacks(made: tuple[LocalStore, Manifest]) -> None:
    store, manifest = made
    audio = manifest.shards[2].audio
    assert audio is not None
    table = pq.read_table(store.base / audio.path)
    assert table.num_rows >= 2
    buf = io.BytesIO()
    pq.write_table(table.slice(1), buf)  # a valid audio file, one clip short
    (store.base / audio.path).write_bytes(buf.getvalue())
    missing_id = table.column("id")[0].as_py()

    found = _problems(store, manifest)
    assert set(found) == {audio.path, manifest.shards[2].path}
    assert any(p.startswith("size ") for p in found[audio.path])
    assert any(p.startswith(f"rows {table.num_rows - 1} != manifest {table.num_rows}") for p in found[audio.path])
    [lacking] = found[manifest.shards[2].path]
    assert f"1 of its {manifest.shards[2].rows} ids are not in its audio file {audio.path}" in lacking
    assert repr(missing_id) in lacking


def test_verify_names_an_audio_file_without_its_columns(made: tuple[LocalStore, Manifest]) -> None:
    store, manifest = made
    audio = manifest.shards[0].audio
    assert audio is not None
    buf = io.BytesIO()
    pq.write_table(pq.read_table(store.base / audio.path).drop_columns(["audio"]), buf)
    (store.base / audio.path).write_bytes(buf.getvalue())
    problems = _problems(store, manifest)[audio.path]
    assert any(p.startswith("no 'audio' column") for p in problems), problems


def test_verify_a_version_without_audio_files_as_before(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    manifest = commit_tables(store, "old", "r1", [rows_table([("a", "x"), ("b", "x")])])
    assert manifest.shards[0].audio is None
    report = verify_manifest(store, manifest)
    assert report.ok and report.audio_files_checked == 0, report.summary()
    assert "audio files" not in report.summary()
