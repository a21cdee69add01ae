"""`handle.torch_dataset()` under `torch.utils.data.DataLoader(batch_size=4)`: with torch's default
collate (rows built with `batchable=True`, no decoded audio) and with `collate_speech_batch`
(decoded audio, padded), in the main process and with 2 workers; values checked against the rows.
The batch mode (`torch_dataset(batch_size=4)` under `DataLoader(batch_size=None)`) gives the very
same batches, in the same order."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from storage.objectstore import LocalStore
from tests.support.batches import assert_batch_equal
from tests.support.datasets_support import LocalVersion
from tests.support.longform import SegmentedVersion, assert_recording_slice, segment_span
from tests.support.stored import stored_rows as rows_from_files

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader

from storage.torch_dataset import SpeechPairsIterableDataset, collate_speech_batch, pass_batch

BATCH = 4
FLOAT_FEATURES = ["pitch_mean_hz", "snr_db", "c50_db", "speaking_rate_wps", "gender_score", "emotion_score"]


def expected_batches(local_version: LocalVersion, ds: SpeechPairsIterableDataset, workers: int) -> list[list[str]]:
    """Ids per batch in the order DataLoader yields them: each worker batches its own pieces,
    and the loader takes one batch from each worker in turn (skipping workers that are done)."""
    handle = local_version.handle()
    shard_ids = [[x for b in handle.iter_shard(s, ["id"]) for x in b.column("id").to_pylist()]
                 for s in range(len(handle.manifest.shards))]
    per_worker = []
    for w in range(max(workers, 1)):
        ids = [x for s, a, b in ds.pieces(w, max(workers, 1)) for x in shard_ids[s][a:b]]
        per_worker.append([ids[i:i + BATCH] for i in range(0, len(ids), BATCH)])
    out = []
    for k in range(max(len(b) for b in per_worker)):
        out += [batches[k] for batches in per_worker if k < len(batches)]
    return out


def stored_rows(local_version: LocalVersion) -> dict[str, dict[str, Any]]:
    """The stored rows, audio bytes from the shards' audio files by id (audio stored once)."""
    return rows_from_files(LocalStore(local_version.root), local_version.handle().manifest)


def assert_numbers(values: Any, expected: list[Any]) -> None:
    """A tensor equal to `expected`, with NaN exactly where the stored value is missing."""
    assert isinstance(values, torch.Tensor) and values.shape == (len(expected),)
    for got, want in zip(values.tolist(), expected, strict=True):
        if want is None:
            assert math.isnan(got)
        else:
            assert got == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_default_collate_over_batchable_rows(local_version: LocalVersion, workers: int) -> None:
    ds = local_version.handle().torch_dataset(decode_audio=False, batchable=True, seed=5)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=workers, timeout=120 if workers else 0)
    batches = list(loader)
    assert [b["id"] for b in batches] == expected_batches(local_version, ds, workers)
    rows = stored_rows(local_version)
    missing_seen = False
    for batch in batches:
        want = [rows[i] for i in batch["id"]]
        assert_numbers(batch["duration_s"], [r["duration_s"] for r in want])
        assert_numbers(batch["sampling_rate"], [r["sampling_rate"] for r in want])
        for name in FLOAT_FEATURES:
            assert_numbers(batch["features"][name], [r["features"][name] for r in want])
            missing_seen |= any(r["features"][name] is None for r in want)
        assert batch["features"]["emotion"] == [r["features"]["emotion"] or "" for r in want]
        assert batch["transcript"] == [r["transcript"] or "" for r in want]
        assert batch["labels"] == [r["labels"] for r in want]  # JSON text, as stored
        assert [json.loads(t) for t in batch["messages"]] == [r["messages"] for r in want]
        assert_numbers(batch["generation"]["max_tokens"], [r["generation"]["max_tokens"] for r in want])
        assert batch["provenance"]["created_at"] == [r["provenance"]["created_at"].isoformat() for r in want]
        assert batch["audio"]["bytes"] == [r["audio"]["bytes"] for r in want]
    assert missing_seen  # the sample corpus has unmeasured features (no C50, no emotion model)


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_speech_batch_pads_audio(local_version: LocalVersion, workers: int) -> None:
    from storage.torch_dataset import decode_audio_bytes

    ds = local_version.handle().torch_dataset(seed=5)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=collate_speech_batch,
                        timeout=120 if workers else 0)
    batches = list(loader)
    assert [b["id"] for b in batches] == expected_batches(local_version, ds, workers)
    rows = stored_rows(local_version)
    lengths_seen = set()
    for batch in batches:
        want = [rows[i] for i in batch["id"]]
        decoded = [decode_audio_bytes(r["audio"]["bytes"]) for r in want]
        audio, lengths = batch["audio_array"], batch["audio_lengths"]
        assert audio.dtype == torch.float32 and lengths.dtype == torch.int64
        assert lengths.tolist() == [len(d) for d in decoded] and audio.shape == (len(want), max(map(len, decoded)))
        for k, d in enumerate(decoded):
            assert np.array_equal(audio[k, : len(d)].numpy(), d) and not audio[k, len(d):].any()
        lengths_seen |= set(lengths.tolist())
        for name in FLOAT_FEATURES:
            assert_numbers(batch["features"][name], [r["features"][name] for r in want])
        assert batch["features"]["emotion"] == [r["features"]["emotion"] for r in want]  # None kept
        assert batch["transcript"] == [r["transcript"] for r in want]
        labels = [json.loads(r["labels"]) for r in want]
        keys = {k for lab in labels for k in lab}
        assert batch["labels"] == {k: [lab.get(k) for lab in labels] for k in keys}
        assert batch["messages"] == [r["messages"] for r in want]
        assert batch["sampling_rate"].tolist() == [16_000] * len(want)
    assert len(lengths_seen) > 1  # clips of different lengths were padded


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_mode_gives_the_collated_batches(local_version: LocalVersion, workers: int) -> None:
    """Batches built by column in the worker equal the rows collated by `collate_speech_batch`:
    same ids in the same order, numbers, strings, dicts, and audio sample-exact with its lengths."""
    timeout = 120 if workers else 0
    rows_ds = local_version.handle().torch_dataset(seed=5)
    collated = list(DataLoader(rows_ds, batch_size=BATCH, num_workers=workers, collate_fn=collate_speech_batch,
                               timeout=timeout))
    batch_ds = local_version.handle().torch_dataset(seed=5, batch_size=BATCH)
    batches = list(DataLoader(batch_ds, batch_size=None, num_workers=workers, timeout=timeout))
    assert [b["id"] for b in batches] == expected_batches(local_version, batch_ds, workers)
    # The README's loader (collate_fn=pass_batch: no default_convert walk) hands over the same batches.
    passed = list(DataLoader(batch_ds, batch_size=None, num_workers=workers, timeout=timeout, collate_fn=pass_batch))
    assert len(passed) == len(batches)
    for k, (got, want) in enumerate(zip(passed, batches, strict=True)):
        assert_batch_equal(got, want, f"passed batch {k}")
    assert len(batches) == len(collated)
    for k, (got, want) in enumerate(zip(batches, collated, strict=True)):
        assert_batch_equal(got, want, f"batch {k}")
    rows = stored_rows(local_version)
    for batch in batches:
        assert batch["transcript"] == [rows[i]["transcript"] for i in batch["id"]]
        assert_numbers(batch["duration_s"], [rows[i]["duration_s"] for i in batch["id"]])


def test_default_collate_needs_batchable_rows(local_version: LocalVersion) -> None:
    """What the docstring says: plain rows (json dicts, None strings) are not for the default collate."""
    from torch.utils.data import default_collate

    rows = list(local_version.handle().torch_dataset(decode_audio=False, shuffle_shards=False))
    assert isinstance(rows[0]["labels"], dict) and math.isnan(rows[0]["features"]["c50_db"])
    with pytest.raises((TypeError, KeyError, RuntimeError)):
        default_collate(rows[:BATCH])


def test_segment_rows_through_the_loader(segmented_version: SegmentedVersion) -> None:
    """DataLoader + collate_speech_batch over a version with segments: audio_offset_s is the start in
    each segment's id (NaN for the whole clip), and each padded row is the recording's slice."""
    ds = segmented_version.local.handle().torch_dataset(seed=5)
    segments = 0
    for batch in DataLoader(ds, batch_size=BATCH, collate_fn=collate_speech_batch):
        for k, row_id in enumerate(batch["id"]):
            offset, span = float(batch["audio_offset_s"][k]), segment_span(row_id)
            if span is None:
                assert row_id == segmented_version.whole_id and math.isnan(offset)
                continue
            assert np.float32(offset) == np.float32(span[0]), row_id
            audio = batch["audio_array"][k, : int(batch["audio_lengths"][k])].numpy()
            assert_recording_slice(audio, int(batch["sampling_rate"][k]), segmented_version.recording, offset,
                                   float(batch["duration_s"][k]))
            segments += 1
    assert segments >= 3
