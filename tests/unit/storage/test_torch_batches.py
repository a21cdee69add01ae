"""The torch loader's batch mode (`torch_dataset(batch_size=N)`): batches built by column in the worker.

Checked against the per-row mode collated by `collate_speech_batch` (the same values, sample-exact
audio), against the stored rows read with pyarrow, and for the split guarantees under real
DataLoader worker processes on a local root and on a real SeaweedFS S3 server.
"""

from __future__ import annotations

import multiprocessing
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pytest

from schemas.config import S3Config
from storage.reader import DatasetHandle, open_dataset
from tests.support.batches import assert_batch_equal
from tests.support.datasets_support import make_version, open_local_version
from tests.support.seaweedfs import SeaweedS3

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader

from storage.torch_dataset import collate_speech_batch, decode_audio_bytes
from tests.support.stored import stored_rows

ROWS = 30


@pytest.fixture(scope="module")
def local_v30(tmp_path_factory: pytest.TempPathFactory) -> DatasetHandle:
    """30 rows in 8 shards of ≤4 (batches of 7 cross shard boundaries)."""
    return open_local_version(tmp_path_factory.mktemp("batches_v30"))


@pytest.fixture(scope="module")
def s3_v30(tmp_path_factory: pytest.TempPathFactory, seaweedfs_server: SeaweedS3) -> DatasetHandle:
    root = seaweedfs_server.root(f"batches-{uuid.uuid4().hex[:10]}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", seaweedfs_server.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs_server.secret_key)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        manifest = make_version(root, "demo", workdir=tmp_path_factory.mktemp("batches_s3"), repeat=3, shard_size=4,
                                s3_endpoint=seaweedfs_server.endpoint_url, s3_region=seaweedfs_server.region)
    s3 = S3Config(endpoint_url=seaweedfs_server.endpoint_url, region=seaweedfs_server.region,
                  addressing_style="path")
    return open_dataset(f"{root}/demo", manifest.lineage.version, s3=s3)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def v30(request: pytest.FixtureRequest) -> DatasetHandle:
    if request.param == "local":
        return request.getfixturevalue("local_v30")  # type: ignore[no-any-return]
    request.getfixturevalue("seaweedfs")  # AWS_* variables of the server for this test
    return request.getfixturevalue("s3_v30")  # type: ignore[no-any-return]


def stored(handle: DatasetHandle) -> dict[str, dict[str, Any]]:
    """The version's rows by id, read straight from the shard (and audio) files with pyarrow."""
    return stored_rows(handle.store, handle.manifest)


@pytest.mark.parametrize("size", [4, 7, 64])
def test_batches_equal_rows_collated(local_v30: DatasetHandle, size: int) -> None:
    rows = list(local_v30.torch_dataset(seed=3))
    batches = list(local_v30.torch_dataset(seed=3, batch_size=size))
    assert [len(b["id"]) for b in batches] == [min(size, ROWS - i) for i in range(0, ROWS, size)]
    for k, batch in enumerate(batches):
        assert_batch_equal(batch, collate_speech_batch(rows[k * size:(k + 1) * size]), f"batch {k}")


def test_batch_audio_is_padded_and_sample_exact(local_v30: DatasetHandle) -> None:
    want = stored(local_v30)
    lengths_seen = set()
    for batch in local_v30.torch_dataset(batch_size=8, columns=["id"], seed=1):
        audio, lengths = batch["audio_array"], batch["audio_lengths"]
        assert audio.dtype == torch.float32 and lengths.dtype == torch.int64
        decoded = [decode_audio_bytes(want[i]["audio"]["bytes"]) for i in batch["id"]]
        assert lengths.tolist() == [len(d) for d in decoded]
        assert audio.shape == (len(decoded), max(lengths.tolist()))
        for k, d in enumerate(decoded):
            assert np.array_equal(audio[k, : len(d)].numpy(), d)
            assert not audio[k, len(d):].any()  # zeros beyond the clip
        assert batch["sampling_rate"].tolist() == [16_000] * len(decoded)
        lengths_seen |= set(lengths.tolist())
    assert len(lengths_seen) > 1


def tensors_of(batch: dict[str, Any]) -> list[Any]:
    out = []
    for value in batch.values():
        out += tensors_of(value) if isinstance(value, dict) else [value] if isinstance(value, torch.Tensor) else []
    return out


def test_batch_tensors_share_one_storage(local_v30: DatasetHandle) -> None:
    """Handed between processes as one shared-memory segment per batch, not one per column or dtype."""
    batch = next(iter(local_v30.torch_dataset(batch_size=6, seed=2)))
    tensors = tensors_of(batch)
    assert {torch.float32, torch.float64, torch.int64} <= {t.dtype for t in tensors} and len(tensors) > 10
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    rows = list(local_v30.torch_dataset(seed=2))[:6]
    assert_batch_equal(batch, collate_speech_batch(rows))  # views with the same values as separate tensors
    undecoded = tensors_of(next(iter(local_v30.torch_dataset(batch_size=6, seed=2, decode_audio=False))))
    assert len({t.untyped_storage().data_ptr() for t in undecoded}) == 1


def test_batch_holds_only_the_columns_asked_for(local_v30: DatasetHandle) -> None:
    want = stored(local_v30)
    decoded = next(iter(local_v30.torch_dataset(batch_size=5, columns=["id", "duration_s"])))
    assert set(decoded) == {"id", "duration_s", "audio_array", "audio_lengths", "sampling_rate"}
    assert "audio" not in decoded  # read to decode, not handed over
    assert decoded["duration_s"].dtype == torch.float64
    assert decoded["duration_s"].tolist() == pytest.approx([want[i]["duration_s"] for i in decoded["id"]])
    plain = next(iter(local_v30.torch_dataset(batch_size=5, columns=["id", "transcript"], decode_audio=False)))
    assert set(plain) == {"id", "transcript"}
    assert plain["transcript"] == [want[i]["transcript"] for i in plain["id"]]
    raw = next(iter(local_v30.torch_dataset(batch_size=5, columns=["id", "audio"], decode_audio=False)))
    assert set(raw) == {"id", "audio"} and set(raw["audio"]) == {"bytes", "path"}
    assert raw["audio"]["bytes"] == [want[i]["audio"]["bytes"] for i in raw["id"]]
    with pytest.raises(ValueError, match="batch_size"):
        local_v30.torch_dataset(batch_size=4, batchable=True)
    with pytest.raises(ValueError, match="batch_size"):
        local_v30.torch_dataset(batch_size=0)


def _loader_batches(handle: DatasetHandle, *, world_size: int, epoch: int, **kw: Any) -> list[list[list[str]]]:
    """Per rank, the id lists of the batches its DataLoader (2 forked workers) yields."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    out = []
    for rank in range(world_size):
        ds = handle.torch_dataset(world_size=world_size, rank=rank, seed=11, batch_size=3, **kw)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=2, timeout=120,
                            multiprocessing_context=multiprocessing.get_context("fork"))
        out.append([b["id"] for b in loader])
    return out


@pytest.mark.parametrize("split", ["auto", "rows"])
def test_batches_cover_version_once_over_ranks_and_workers(v30: DatasetHandle, split: str) -> None:
    version_ids = sorted(v30.to_arrow(["id"]).column("id").to_pylist())
    orders = []
    for epoch in (0, 1):
        per_rank = _loader_batches(v30, world_size=2, epoch=epoch, split=split, columns=["id", "duration_s"])
        ids = [i for batches in per_rank for b in batches for i in b]
        assert Counter(ids) == Counter(version_ids)  # each row once: none missing, none twice
        sizes = [len(b) for batches in per_rank for b in batches]
        assert sum(s < 3 for s in sizes) <= 4  # only a consumer's (rank × worker) last batch is short
        if split == "rows":
            assert sorted(sum(map(len, batches)) for batches in per_rank) == [15, 15]
        orders.append(ids)
    assert orders[0] != orders[1]  # set_epoch reshuffles the shard order


def test_persistent_workers_follow_set_epoch(local_v30: DatasetHandle) -> None:
    """Workers forked once (persistent_workers) read each epoch's shard order from set_epoch in the
    main process: every epoch equals what freshly forked workers give for that epoch."""
    import copy
    import pickle

    from storage.torch_dataset import pass_batch

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    fork = multiprocessing.get_context("fork")
    kw: dict[str, Any] = {"seed": 5, "batch_size": 4, "columns": ["id"], "decode_audio": False}
    ds = local_v30.torch_dataset(**kw)
    persistent = DataLoader(ds, batch_size=None, num_workers=2, timeout=120, collate_fn=pass_batch,
                            persistent_workers=True, multiprocessing_context=fork)
    orders = []
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        got = [b["id"] for b in persistent]
        fresh = local_v30.torch_dataset(**kw)
        fresh.set_epoch(epoch)
        want = [b["id"] for b in DataLoader(fresh, batch_size=None, num_workers=2, timeout=120,
                                            collate_fn=pass_batch, multiprocessing_context=fork)]
        assert got == want, epoch
        assert Counter(i for b in got for i in b) == Counter(local_v30.to_arrow(["id"]).column("id").to_pylist())
        orders.append(got)
    assert orders[0] != orders[1] != orders[2]
    # A copy keeps the epoch, then goes its own way; a pickled one keeps it too.
    twin = copy.deepcopy(ds)
    assert twin.epoch == 2
    twin.set_epoch(7)
    assert ds.epoch == 2
    assert pickle.loads(pickle.dumps(ds)).epoch == 2


def test_decoded_batches_under_two_workers_match_stored_audio(v30: DatasetHandle) -> None:
    """Audio decoded in the worker processes, over each backend: lengths and samples as libsndfile
    decodes the stored bytes (read with pyarrow from the shard and audio files)."""
    import io

    import soundfile as sf

    want = stored(v30)
    per_rank = []
    for rank in range(2):
        ds = v30.torch_dataset(world_size=2, rank=rank, batch_size=4, columns=["id"])
        per_rank += list(DataLoader(ds, batch_size=None, num_workers=2, timeout=120))
    assert sorted(i for b in per_rank for i in b["id"]) == sorted(want)
    padded = 0  # rows shorter than their batch: their padding must read as zeros
    for batch in per_rank:
        padded += int((batch["audio_lengths"] < batch["audio_array"].shape[1]).sum())
        # The batch crossed the process boundary as one shared-memory segment: every tensor a view of it.
        assert len({t.untyped_storage().data_ptr() for t in tensors_of(batch)}) == 1
        for k, row_id in enumerate(batch["id"]):
            clip, _ = sf.read(io.BytesIO(want[row_id]["audio"]["bytes"]), dtype="float32")
            n = int(batch["audio_lengths"][k])
            assert n == len(clip) and np.array_equal(batch["audio_array"][k, :n].numpy(), clip)
            assert not batch["audio_array"][k, n:].any()
    assert padded > 0


def test_prefetched_reads_ahead_raises_in_caller_and_stops_when_closed() -> None:
    import threading

    from storage.torch_batches import prefetched

    produced: list[int] = []

    def numbers(fail_at: int | None = None) -> Any:
        for i in range(100):
            if i == fail_at:
                raise OSError(f"read failed at {i}")
            produced.append(i)
            yield i

    assert list(prefetched(numbers, depth=3)) == list(range(100))
    with pytest.raises(OSError, match="read failed at 5"):
        list(prefetched(lambda: numbers(fail_at=5)))
    produced.clear()
    stream = prefetched(numbers, depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # the consumer stops early: the thread must not read the rest
    for thread in threading.enumerate():
        if thread.name == "speechpairs-prefetch":
            thread.join(timeout=30)
            assert not thread.is_alive()
    assert len(produced) <= 3 + 2 + 1  # consumed, queued, one in hand
