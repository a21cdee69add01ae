"""A torch `IterableDataset` over one committed version: sharded across ranks and workers.

torch is a dev/training dependency, not a runtime one: this module imports it at the top, so
import it only where torch is installed (`DatasetHandle.torch_dataset()` imports it lazily, and
`storage/__init__` never does).

Batch mode, for training (each worker reads, converts and decodes whole batches, and hands the
loader one ready batch per step):

    ds = open_dataset("s3://bucket/prefix/demo@stable").torch_dataset(
        world_size=ws, rank=rank, seed=0, batch_size=16, columns=["id", "transcript"])
    loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=pass_batch,  # the dataset batches
                        persistent_workers=True)  # workers forked once, not every epoch
    for epoch in range(epochs):
        ds.set_epoch(epoch)            # before creating the epoch's iterator (persistent workers see it)
        for batch in loader: ...       # batch["audio_array"]: [16, longest] float32, batch["audio_lengths"]

Only the `columns` asked for are read (plus "audio" when decoding; it is then not in the batch
unless asked for). A batch is what `collate_speech_batch` makes of the same rows (see below), built
by column (storage/torch_batches.py): "audio_array" zero-padded float32 [N, longest],
"audio_lengths" int64 [N], "sampling_rate" int64 [N]; numbers int64 or float64 tensors (NaN for a
missing value); structs and json dicts batched key by key; strings, lists, timestamps Python lists.
Every batch holds `batch_size` rows except the last one of each worker (rank × worker stream).

Per-row mode (`batch_size=None`, the default) yields one row at a time, as a dict (json columns
decoded to dicts); batch its rows in the loader:
- `DataLoader(ds, batch_size=N, collate_fn=collate_speech_batch)`: whenever audio is decoded (clips
  differ in length): zero-padded audio plus true lengths; numbers become tensors, dicts are batched
  key by key, everything else (strings, None, lists, json dicts' values) stays a list. Works on any row.
- `DataLoader(ds, batch_size=N)` with torch's default collate: for rows without decoded audio,
  built with `batchable=True` (`torch_dataset(decode_audio=False, batchable=True)`): every value is
  then one the default collate can batch (see `SpeechPairsIterableDataset`).
- `batch_size=None` in the loader too: rows one by one.
Either way a missing numeric value (a feature that was not measured, an unset sampling
parameter) is NaN, never None.

Split: the consumers are world_size × num_workers streams; consumer c = rank·num_workers + worker.
Each epoch the shard order is a permutation drawn from (seed, epoch), the same on every rank.
`split="shards"` deals whole shards round-robin over that order (each consumer opens only its own
shards); `split="rows"` cuts the concatenation of the shards (in that order) into one contiguous,
equal (±1 row) range per consumer, reading only the row groups that overlap it. `split="auto"`
(default) uses shards when there are at least as many shards as consumers, rows otherwise. Either
way, in both modes, the union over all consumers is exactly the version's rows, each once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from schemas.arrow import SAMPLING_RATE
from schemas.config import S3Config
from storage.batch_memory import WorkerMemory
from storage.reader import DatasetHandle, open_dataset
from storage.torch_batches import (
    arrow_to_batch,
    collate_speech_batch,
    decode_audio_bytes,
    decode_or_raise,
    pad_audio,
    pass_batch,
    prefetched,
    preload_worker_imports,
    row_converters,
)

Split = Literal["auto", "shards", "rows"]
# (shard index, first row, end row) — a piece of one shard that one consumer reads.
Piece = tuple[int, int, int]


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch's shard order: a permutation fixed by (seed, epoch), identical in every process."""
    if not shuffle:
        return list(range(num_shards))
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF])
    return [int(i) for i in rng.permutation(num_shards)]


def assign_pieces(shard_rows: list[int], order: list[int], consumers: int, index: int,
                  split: Split = "auto") -> list[Piece]:
    """What consumer `index` of `consumers` reads: whole shards, or one contiguous range of rows.

    Pure and deterministic; the pieces of all consumers partition every row of every shard.
    """
    if consumers < 1 or not 0 <= index < consumers:
        raise ValueError(f"consumer {index} of {consumers}")
    mode = split if split != "auto" else ("shards" if len(order) >= consumers else "rows")
    if mode == "shards":
        return [(s, 0, shard_rows[s]) for s in order[index::consumers] if shard_rows[s] > 0]
    if mode != "rows":
        raise ValueError(f"split must be 'auto', 'shards' or 'rows', not {split!r}")
    total = sum(shard_rows[s] for s in order)
    lo, hi = total * index // consumers, total * (index + 1) // consumers
    pieces: list[Piece] = []
    offset = 0
    for s in order:
        n = shard_rows[s]
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            pieces.append((s, a - offset, b - offset))
        offset += n
        if offset >= hi:
            break
    return pieces


class SpeechPairsIterableDataset(IterableDataset[dict[str, Any]]):
    """Rows (or, with `batch_size`, batches) of one committed version, split over ranks × workers.

    Each row holds the requested `columns` (all by default; `json` columns such as labels and
    attributes decoded to dicts; a null number is NaN) and, with `decode_audio`, "audio_array"
    (float32, mono, `sampling_rate` Hz) and "sampling_rate". Batch it with `batch_size=None`, with
    `collate_fn=collate_speech_batch` (pads the audio), or, with `batchable=True` and no decoded
    audio, with torch's default collate: then a null string is "", json columns stay JSON text,
    timestamps are ISO-8601 text and list columns (messages, segments) are JSON text.
    With `batch_size=N` it yields batches of N rows equal to `collate_speech_batch` of those rows
    (use `DataLoader(ds, batch_size=None)`); `batchable` does not apply there.
    """

    def __init__(self, source: DatasetHandle | str, *, version: str | None = None, s3: S3Config | None = None,
                 columns: list[str] | None = None, world_size: int = 1, rank: int = 0,
                 shuffle_shards: bool = True, seed: int = 0, decode_audio: bool = True,
                 sampling_rate: int = SAMPLING_RATE, split: Split = "auto", read_batch_size: int = 64,
                 batchable: bool = False, batch_size: int | None = None) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if split not in ("auto", "shards", "rows"):
            raise ValueError(f"split must be 'auto', 'shards' or 'rows', not {split!r}")
        if batch_size is not None and (batch_size < 1 or batchable):
            raise ValueError(f"batch_size must be a positive number of rows and excludes batchable, "
                             f"not {batch_size!r} with batchable={batchable}")
        self.handle = source if isinstance(source, DatasetHandle) else open_dataset(source, version, s3=s3)
        self.columns = self.handle.check_columns(columns)
        self.world_size, self.rank = world_size, rank
        self.shuffle_shards, self.seed = shuffle_shards, seed
        # The epoch lives in shared memory: persistent DataLoader workers (forked once, each holding a
        # copy of this object) read the value set_epoch wrote in the main process. A pickled copy
        # (spawned workers) shares it too; a plain copy (copy.deepcopy) gets its own.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._worker_handle: tuple[int, DatasetHandle] | None = None
        self._worker_memory: WorkerMemory | None = None
        self.decode_audio, self.sampling_rate = decode_audio, sampling_rate
        self.split: Split = split
        self.read_batch_size = max(1, read_batch_size)
        self.batchable = batchable
        self.batch_size = batch_size
        preload_worker_imports(decode_audio)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order for `epoch` (call on every rank, before creating the epoch's
        iterator; persistent workers see it too)."""
        self._epoch[0] = epoch

    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Indices into the manifest's shards, in the order this epoch reads them."""
        return shard_order(len(self.handle.manifest.shards), seed=self.seed,
                           epoch=self.epoch if epoch is None else epoch, shuffle=self.shuffle_shards)

    def pieces(self, worker_id: int = 0, num_workers: int = 1, epoch: int | None = None) -> list[Piece]:
        """(shard, start, stop) pieces that this rank's worker `worker_id` reads in `epoch`."""
        rows = [s.rows for s in self.handle.manifest.shards]
        return assign_pieces(rows, self.shard_order(epoch), self.world_size * num_workers,
                             self.rank * num_workers + worker_id, self.split)

    def _handle_in_worker(self) -> DatasetHandle:
        """This worker process's own handle (a forked copy must not share the parent's filesystem
        connection), made once: a persistent worker keeps it, and its open connections, across epochs."""
        pid = os.getpid()
        if self._worker_handle is None or self._worker_handle[0] != pid:
            self._worker_handle = (pid, self.handle.detached())
        return self._worker_handle[1]

    def _memory_in_worker(self) -> WorkerMemory | None:
        """This worker process's batch memory (storage.batch_memory); None outside a worker."""
        if get_worker_info() is None:
            return None
        if self._worker_memory is None or self._worker_memory.pid != os.getpid():
            self._worker_memory = WorkerMemory()
        return self._worker_memory

    def _read_columns(self) -> list[str] | None:
        if self.columns is None or not self.decode_audio or "audio" in self.columns:
            return self.columns
        return [*self.columns, "audio"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        handle = self.handle if info is None else self._handle_in_worker()
        if info is not None and num_workers > 1:
            _one_core_each()
        pieces = self.pieces(worker_id, num_workers)
        if self.batch_size is not None:
            yield from self._iter_batches(handle, pieces, self.batch_size)
            return
        read = self._read_columns()
        drop_audio = self.decode_audio and self.columns is not None and "audio" not in self.columns
        converters = row_converters(handle.schema, read, self.batchable)
        for shard, start, stop in pieces:
            for batch in handle.iter_shard(shard, read, self.read_batch_size, start=start, stop=stop):
                for row in batch.to_pylist():
                    if self.decode_audio:  # from the bytes as stored, before any conversion
                        row["audio_array"] = decode_or_raise((row.get("audio") or {}).get("bytes"),
                                                             self.sampling_rate, handle.uri, row.get("id"))
                        row["sampling_rate"] = self.sampling_rate
                        if drop_audio:
                            del row["audio"]
                    for name, convert in converters:
                        if name in row:
                            row[name] = convert(row[name])
                    yield row

    def _iter_batches(self, handle: DatasetHandle, pieces: list[Piece], size: int) -> Iterator[dict[str, Any]]:
        """Batches of `size` rows over this consumer's pieces in order (the last one may be short)."""
        read = self._read_columns()
        wanted = self.columns if self.columns is not None else handle.schema.names
        keep = [n for n in (read or handle.schema.names) if n in wanted]  # "audio" read only to decode: dropped
        if self.decode_audio and "sampling_rate" in keep:
            keep.remove("sampling_rate")  # replaced by the decoded clips' rate, as in per-row mode

        memory = self._memory_in_worker()

        def convert(table: pa.Table) -> dict[str, Any]:
            return arrow_to_batch(table, keep=keep, decode_audio=self.decode_audio,
                                  sampling_rate=self.sampling_rate, where=handle.uri, memory=memory)

        def record_batches() -> Iterator[pa.RecordBatch]:
            for shard, start, stop in pieces:
                yield from handle.iter_shard(shard, read, size, start=start, stop=stop)

        pending: list[pa.RecordBatch] = []
        held = 0
        # The next record batches are read (from S3: waiting on the network) while this one decodes.
        for batch in prefetched(record_batches, depth=2):
            pending.append(batch)
            held += batch.num_rows
            while held >= size:
                table = pa.Table.from_batches(pending, schema=pending[0].schema)
                yield convert(table.slice(0, size))
                rest = table.slice(size)
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            yield convert(pa.Table.from_batches(pending, schema=pending[0].schema))

    def __repr__(self) -> str:
        return (f"SpeechPairsIterableDataset({self.handle.uri!r}, rank={self.rank}/{self.world_size}, "
                f"epoch={self.epoch}, split={self.split!r}, batch_size={self.batch_size})")


def _one_core_each() -> None:
    """Several DataLoader workers: each decodes with one pyarrow thread, so they share the cores
    instead of each starting a thread per core (as torch sets one intra-op thread per worker)."""
    pa.set_cpu_count(1)


__all__ = ["SpeechPairsIterableDataset", "assign_pieces", "collate_speech_batch", "decode_audio_bytes", "pad_audio",
           "pass_batch", "row_converters", "shard_order"]
