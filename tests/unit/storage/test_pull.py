"""`datasets pull` of a version whose audio is stored once: the copy is self-contained (joined
shards, their own checksums, no audio files), every reader gets the audio files' bytes from it, a
rerun rewrites nothing, and a corrupt input stops the pull naming it.

The version comes from the real stages on the 10-clip sample corpus (tests/support/datasets_support.py).
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from schemas.manifest import Manifest
from storage.card import render_card
from storage.objectstore import LocalStore
from storage.pull import PullError, pull_version
from storage.reader import open_dataset
from storage.versions import file_key, read_manifest
from tests.support.datasets_support import make_version
from tests.support.stored import stored_rows

DS = "demo"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local root with demo v0001 (10 rows, 3 shards, audio in audio files). Read-only: copy it to change it."""
    work = tmp_path_factory.mktemp("pull")
    manifest = make_version(str(work / "root"), DS, workdir=work)
    assert len(manifest.shards) == 3 and all(s.audio is not None for s in manifest.shards)
    return work / "root"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_pulled_copy_is_self_contained_and_resumable(root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(root)
    stored = read_manifest(store, DS, "v0001")
    oracle = stored_rows(store, stored)
    dest = tmp_path / "copy" / DS / "v0001"  # a version folder of a root: open_dataset reads it too
    report = pull_version(store, DS, "v0001", dest)
    names = [f"data/train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert report.downloaded == [*names, "README.md", "manifest.json"] and report.skipped == []
    assert report.bytes_downloaded == report.bytes_total == sum(s.bytes + s.audio.bytes for s in stored.shards
                                                                if s.audio is not None)

    local = Manifest.model_validate_json((dest / "manifest.json").read_bytes())
    assert local.layout == 1 and [s.path for s in local.shards] == names
    for shard, was in zip(local.shards, stored.shards, strict=True):
        assert shard.audio is None and shard.rows == was.rows and shard.sha256 != was.sha256
        assert (shard.bytes, shard.sha256) == ((dest / shard.path).stat().st_size, _sha(dest / shard.path))
    assert (dest / "README.md").read_text() == render_card(local)
    assert not [p for p in dest.rglob("*") if p.name.endswith(".part") or p.name.startswith(".speechpairs-")]

    # Our reader: a plain version now (no join, hf_data_files = its own files), the audio files' bytes.
    ds = open_dataset(f"{tmp_path / 'copy'}/{DS}@v0001")
    # Every shard verifies (checksums, rows, schema); a pull has never copied config.yaml.
    assert [p.path for p in ds.verify().problems] == ["config.yaml"]
    assert ds.hf_data_files() == ds.shard_uris() == [str(dest / n) for n in names]
    table = ds.to_arrow()
    assert table.column("id").to_pylist() == list(oracle)
    assert [a["bytes"] for a in table.column("audio").to_pylist()] == [r["audio"]["bytes"] for r in oracle.values()]
    assert pq.read_schema(dest / names[0]).equals(ds.schema, check_metadata=True)

    # Hugging Face datasets on the folder (the card's configs): the same bytes, the same samples.
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf = datasets.load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "hf"))
    assert hf["id"] == list(oracle)
    raw = hf.cast_column("audio", datasets.Audio(decode=False))
    assert [r["audio"]["bytes"] for r in raw] == [r["audio"]["bytes"] for r in oracle.values()]
    row = hf[3]
    audio = row["audio"]
    got = (np.asarray(audio["array"], dtype=np.float32) if isinstance(audio, dict)
           else audio.get_all_samples().data.numpy()[0])
    want, _ = sf.read(io.BytesIO(oracle[row["id"]]["audio"]["bytes"]), dtype="float32")
    assert np.array_equal(got, want)

    # A rerun downloads and rewrites nothing; a changed local file is the only one written again.
    stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*.parquet")}
    again = pull_version(store, DS, "v0001", dest)
    assert again.downloaded == [] and again.bytes_downloaded == 0
    assert sorted(again.skipped) == sorted([*names, "README.md", "manifest.json"])
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.parquet")} == stamps
    _flip(dest / names[1])
    third = pull_version(store, DS, "v0001", dest)
    assert third.downloaded == [names[1]]
    assert third.bytes_downloaded == stored.shards[1].bytes + stored.shards[1].audio.bytes  # type: ignore[union-attr]
    assert _sha(dest / names[1]) == local.shards[1].sha256


@pytest.mark.parametrize("which", ["shard", "audio"])
def test_a_corrupt_input_stops_the_pull_naming_it(root: Path, tmp_path: Path, which: str) -> None:
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    store = LocalStore(copy)
    manifest = read_manifest(store, DS, "v0001")
    shard = manifest.shards[1]
    victim = shard if which == "shard" else shard.audio
    assert victim is not None
    _flip(copy / file_key(manifest, victim))
    dest = tmp_path / "p"
    with pytest.raises(PullError, match=f"{victim.path} does not match the manifest.*is corrupt"):
        pull_version(store, DS, "v0001", dest)
    assert not (dest / "manifest.json").exists() and not (dest / "data/train-00001-of-00003.parquet").exists()
    assert not [p for p in dest.rglob("*") if p.name.endswith(".part") or p.name.startswith(".speechpairs-")]
