"""A DataLoader worker's batch memory is refilled only once the main process has let go of it.

Under real forked DataLoader workers: every batch is checked against libsndfile's decoding of the
stored bytes when it arrives (refilled memory must not leak the previous batch: padding zero);
batches whose views are still held are never overwritten; the slot protocol itself in one process.
"""

from __future__ import annotations

import gc
import io
import multiprocessing
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from storage.reader import DatasetHandle
from tests.support.datasets_support import open_local_version
from tests.support.stored import stored_rows

torch = pytest.importorskip("torch")
import soundfile as sf
from torch.utils.data import DataLoader

from storage import batch_memory
from storage.batch_memory import SLOTS, WorkerMemory
from storage.torch_batches import arrow_to_batch
from storage.torch_dataset import pass_batch


@pytest.fixture(scope="module")
def v30(tmp_path_factory: pytest.TempPathFactory) -> DatasetHandle:
    return open_local_version(tmp_path_factory.mktemp("batch_memory"))


@pytest.fixture(scope="module")
def clips(v30: DatasetHandle) -> dict[str, np.ndarray]:
    """Each row's audio as libsndfile decodes the bytes pyarrow reads from the stored files."""
    rows = stored_rows(v30.store, v30.manifest)
    return {i: sf.read(io.BytesIO(r["audio"]["bytes"]), dtype="float32")[0] for i, r in rows.items()}


def _loader(v30: DatasetHandle, **kw: Any) -> tuple[Any, DataLoader[Any]]:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ds = v30.torch_dataset(seed=4, batch_size=2, columns=["id", "duration_s"])
    return ds, DataLoader(ds, batch_size=None, num_workers=2, timeout=120, persistent_workers=True,
                          multiprocessing_context=multiprocessing.get_context("fork"), **kw)


def _check(batch: dict[str, Any], clips: dict[str, np.ndarray]) -> None:
    audio, lengths = batch["audio_array"], batch["audio_lengths"]
    for k, row_id in enumerate(batch["id"]):
        n = int(lengths[k])
        assert n == len(clips[row_id]) and np.array_equal(audio[k, :n].numpy(), clips[row_id]), row_id
        assert not audio[k, n:].any(), f"{row_id}: padding of refilled memory is not zero"


@pytest.mark.parametrize("collate", ["pass_batch", "default"])
def test_memory_is_refilled_after_release_with_exact_values(v30: DatasetHandle, clips: dict[str, np.ndarray],
                                                             collate: str) -> None:
    """15 batches an epoch, 3 epochs, 2 persistent workers: each worker hands over more batches than
    it has slots, so slots are refilled; every batch still equals the stored audio on arrival.
    The default collate (torch's default_convert copies the batch in the worker) works the same."""
    ds, loader = _loader(v30, **({"collate_fn": pass_batch} if collate == "pass_batch" else {}))
    before = batch_memory.released
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in loader:
            assert type(batch) is dict  # a plain dict in the main process
            _check(batch, clips)
            seen += batch["id"]
            assert batch["duration_s"].tolist() == pytest.approx([len(clips[i]) / 16_000 for i in batch["id"]],
                                                                 abs=1e-3)
    assert sorted(seen) == sorted(list(clips) * 3)
    assert batch_memory.released - before > 2 * SLOTS  # slots really were given back and refilled


def test_memory_of_a_held_view_is_never_refilled(v30: DatasetHandle, clips: dict[str, np.ndarray]) -> None:
    """Only a view of each batch's audio (and its ids) is kept, the dict dropped: the storage is still
    in use, so no slot is given back and the worker takes new memory; every view keeps its samples."""
    gc.collect()
    batch_memory._sweep()  # batches of earlier tests, let go of since, are not this test's
    ds, loader = _loader(v30, collate_fn=pass_batch)
    before = batch_memory.released
    held = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in loader:
            held.append((batch["id"][0], batch["audio_array"][0], int(batch["audio_lengths"][0])))
            del batch
    assert len(held) == 45
    assert batch_memory.released == before
    for row_id, audio, n in held:
        assert np.array_equal(audio[:n].numpy(), clips[row_id]) and not audio[n:].any(), row_id


def test_slots_claimed_refused_released_and_grown() -> None:
    memory = WorkerMemory()
    claimed = [memory.storage(1000) for _ in range(SLOTS)]
    assert [lease for _, lease in claimed] == [(k, k + 1) for k in range(SLOTS)]
    overflow, lease = memory.storage(1000)
    assert lease is None and overflow.is_shared()  # every slot taken: new memory
    first = claimed[0][0]
    memory.release((0, 99))  # not the slot's lease: nothing happens
    assert memory.storage(10)[1] is None
    memory.release(claimed[0][1])
    again, lease = memory.storage(1000)
    assert lease == (0, SLOTS + 1) and again.data_ptr() == first.data_ptr()  # the same memory, refilled
    memory.release(lease)
    bigger, lease = memory.storage(first.nbytes() + 1)
    assert lease == (0, SLOTS + 2) and bigger.nbytes() > first.nbytes()


def test_a_batch_that_fails_to_decode_gives_its_slot_back(v30: DatasetHandle) -> None:
    table = v30.to_arrow(["id", "audio"]).slice(0, 3)
    audio = table.column("audio").combine_chunks()
    broken = pa.StructArray.from_arrays([pa.array([b"fLaC" + b"\0" * 60] * 3, pa.binary()), audio.field("path")],
                                        fields=list(audio.type))
    table = table.set_column(1, "audio", broken)
    memory = WorkerMemory()
    with pytest.raises(RuntimeError, match="cannot decode audio of row"):
        arrow_to_batch(table, keep=["id"], decode_audio=True, sampling_rate=16_000, where="v", memory=memory)
    assert not memory.table[1:].any()  # no slot left taken
