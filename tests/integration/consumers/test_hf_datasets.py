"""`datasets.load_dataset(<version folder>)` reads the dataset card's YAML without a warning and
gives rows equal to the stored ones; audio (stored once, in audio files) decodes equal from a pulled
copy and from `hf_data_files()`."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from storage.objectstore import LocalStore
from storage.pull import pull_version
from tests.support.datasets_support import LocalVersion
from tests.support.longform import SegmentedVersion, assert_recording_slice, segment_span
from tests.support.stored import stored_rows

datasets = pytest.importorskip("datasets")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_capturing(folder: Path, cache: Path) -> tuple[object, list[str]]:
    """load_dataset(folder) with Python warnings and the `datasets` logger's warnings captured."""
    handler = _Records()
    logger = logging.getLogger("datasets")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(cache))
    finally:
        logger.removeHandler(handler)
    return ds, handler.messages + [str(w.message) for w in caught]


def about_card(messages: list[str]) -> list[str]:
    return [m for m in messages if any(k in m for k in ("split", "num_bytes", "dataset_info", "card", "YAML"))]


def _decoded(audio: object) -> tuple[np.ndarray, int]:
    """(samples, rate) of a decoded `Audio` value: a dict under datasets < 4, a torchcodec decoder after."""
    if isinstance(audio, dict):
        return np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
    samples = audio.get_all_samples()  # type: ignore[attr-defined]
    return samples.data.numpy()[0], int(samples.sample_rate)


def test_version_folder_loads_without_card_warnings(local_version: LocalVersion, tmp_path: Path) -> None:
    """The version folder's card lists the row shards as stored: every column, audio as its clip name
    (its bytes are stored once, in audio files); a pulled copy holds them and decodes equal."""
    ds, messages = load_capturing(local_version.version_dir, tmp_path / "hf")
    assert about_card(messages) == [], messages
    store = LocalStore(local_version.root)
    manifest = local_version.handle().manifest
    assert all(s.audio is not None for s in manifest.shards)
    card = yaml.safe_load((local_version.version_dir / "README.md").read_text()[4:].partition("\n---\n")[0])
    assert card["dataset_info"]["splits"] == [
        {"name": "train", "num_bytes": sum(s.bytes for s in manifest.shards), "num_examples": 10}]
    assert ds.info.splits["train"].num_examples == 10 and ds.num_rows == 10

    stored = stored_rows(store, manifest)  # audio bytes read from the audio files by id
    assert ds["id"] == list(stored)  # every row once, in shard order
    assert ds["response"] == [r["response"] for r in stored.values()]
    names = ds.cast_column("audio", datasets.Audio(decode=False))["audio"]
    assert [(a["bytes"], a["path"]) for a in names] == [(None, r["audio"]["path"]) for r in stored.values()]

    pulled = tmp_path / "pulled"
    pull_version(store, local_version.dataset, local_version.version, pulled)
    ds, messages = load_capturing(pulled, tmp_path / "hf2")
    assert about_card(messages) == [], messages
    assert ds["id"] == list(stored)
    for i in (0, 5, 9):
        row = ds[i]
        assert row["labels"] == json.loads(stored[row["id"]]["labels"])
        got, rate = _decoded(row["audio"])
        want, want_rate = sf.read(io.BytesIO(stored[row["id"]]["audio"]["bytes"]), dtype="float32")
        assert rate == want_rate == 16_000 and np.array_equal(got, want)


def test_the_warning_is_seen_when_splits_lack_num_bytes(local_version: LocalVersion, tmp_path: Path) -> None:
    """Control: the capture above does see the warning a card without num_bytes gives."""
    folder = tmp_path / "old-card"
    # A self-contained copy (the version dir's card points at data keys outside it, see storage/card.py).
    pull_version(LocalStore(local_version.root), local_version.dataset, local_version.version, folder)
    text = (folder / "README.md").read_text()
    header, _, body = text[4:].partition("\n---\n")
    meta = yaml.safe_load(header)
    for split in meta["dataset_info"]["splits"]:
        del split["num_bytes"]
    (folder / "README.md").write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body)
    _, messages = load_capturing(folder, tmp_path / "hf")
    assert any("num_bytes" in m for m in about_card(messages)), messages


def test_segment_rows_through_load_dataset_parquet(segmented_version: SegmentedVersion, tmp_path: Path) -> None:
    """`load_dataset("parquet", data_files=hf_data_files())` (the shards materialised with their audio):
    a segment row's audio_offset_s is the start in its id, its audio the recording's samples from
    there; the whole clip's offset is None."""
    local, rec = segmented_version.local, segmented_version.recording
    files = local.handle().hf_data_files(materialize_to=tmp_path / "m")
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    segments = 0
    for row in ds:
        span = segment_span(row["id"])
        if span is None:
            assert row["id"] == segmented_version.whole_id and row["audio_offset_s"] is None
            continue
        assert row["id"].startswith(segmented_version.recording_id + "@")
        assert np.float32(row["audio_offset_s"]) == np.float32(span[0]), row["id"]  # ms / 1000, as float32
        assert row["duration_s"] == pytest.approx(span[1] - span[0], abs=1e-3)
        audio, rate = _decoded(row["audio"])
        assert_recording_slice(audio, rate, rec, row["audio_offset_s"], row["duration_s"])
        segments += 1
    assert segments >= 3 and ds.num_rows == segments + 1
