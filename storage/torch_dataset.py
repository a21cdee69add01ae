"""A torch `IterableDataset` over one committed version: sharded across ranks and workers.

torch is a dev/training dependency, not a runtime one: this module imports it at the top, so
import it only where torch is installed (`DatasetHandle.torch_dataset()` imports it lazily, and
`storage/__init__` never does).

    ds = open_dataset("s3://bucket/prefix/demo@stable").torch_dataset(world_size=ws, rank=rank, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=4)
    for epoch in range(epochs):
        ds.set_epoch(epoch)            # before creating the epoch's iterator (not with persistent_workers)
        for row in loader: ...         # row["audio_array"]: float32, 16 kHz mono

Split: the consumers are world_size × num_workers streams; consumer c = rank·num_workers + worker.
Each epoch the shard order is a permutation drawn from (seed, epoch), the same on every rank.
`split="shards"` deals whole shards round-robin over that order (each consumer opens only its own
shards); `split="rows"` cuts the concatenation of the shards (in that order) into one contiguous,
equal (±1 row) range per consumer, reading only the row groups that overlap it. `split="auto"`
(default) uses shards when there are at least as many shards as consumers, rows otherwise. Either
way the union over all consumers is exactly the version's rows, each once.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset, get_worker_info

from schemas.arrow import SAMPLING_RATE
from schemas.config import S3Config
from storage.reader import DatasetHandle, open_dataset

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


def _has_json(t: pa.DataType) -> bool:
    if t == pa.json_():
        return True
    if pa.types.is_struct(t):
        return any(_has_json(f.type) for f in t)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_json(t.value_type)
    return False


def _decode_json(value: Any, t: pa.DataType) -> Any:
    """JSON text → Python objects wherever the Arrow type is `json` (labels, attributes, …)."""
    if value is None:
        return None
    if t == pa.json_():
        return json.loads(value)
    if pa.types.is_struct(t):
        return {f.name: _decode_json(value.get(f.name), f.type) for f in t}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_decode_json(v, t.value_type) for v in value]
    return value


def decode_audio_bytes(data: bytes, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Encoded audio (FLAC/WAV/…) → float32 mono array at `sampling_rate` (soxr if resampling)."""
    import soundfile as sf

    samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if sr != sampling_rate:
        import soxr

        mono = soxr.resample(mono, sr, sampling_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


class SpeechPairsIterableDataset(IterableDataset[dict[str, Any]]):
    """Rows of one committed version as dicts, split over ranks × DataLoader workers.

    Each row holds the requested `columns` (all by default; `json` columns such as labels and
    attributes decoded to dicts) and, with `decode_audio`, "audio_array" (float32, mono,
    `sampling_rate` Hz) and "sampling_rate". Use `batch_size=None` or a collate_fn that pads audio.
    """

    def __init__(self, source: DatasetHandle | str, *, version: str | None = None, s3: S3Config | None = None,
                 columns: list[str] | None = None, world_size: int = 1, rank: int = 0,
                 shuffle_shards: bool = True, seed: int = 0, decode_audio: bool = True,
                 sampling_rate: int = SAMPLING_RATE, split: Split = "auto", read_batch_size: int = 64) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if split not in ("auto", "shards", "rows"):
            raise ValueError(f"split must be 'auto', 'shards' or 'rows', not {split!r}")
        self.handle = source if isinstance(source, DatasetHandle) else open_dataset(source, version, s3=s3)
        self.columns = self.handle.check_columns(columns)
        self.world_size, self.rank = world_size, rank
        self.shuffle_shards, self.seed, self.epoch = shuffle_shards, seed, 0
        self.decode_audio, self.sampling_rate = decode_audio, sampling_rate
        self.split: Split = split
        self.read_batch_size = max(1, read_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order for `epoch` (call on every rank, before iterating)."""
        self.epoch = epoch

    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Indices into the manifest's shards, in the order this epoch reads them."""
        return shard_order(len(self.handle.manifest.shards), seed=self.seed,
                           epoch=self.epoch if epoch is None else epoch, shuffle=self.shuffle_shards)

    def pieces(self, worker_id: int = 0, num_workers: int = 1, epoch: int | None = None) -> list[Piece]:
        """(shard, start, stop) pieces that this rank's worker `worker_id` reads in `epoch`."""
        rows = [s.rows for s in self.handle.manifest.shards]
        return assign_pieces(rows, self.shard_order(epoch), self.world_size * num_workers,
                             self.rank * num_workers + worker_id, self.split)

    def _read_columns(self) -> list[str] | None:
        if self.columns is None or not self.decode_audio or "audio" in self.columns:
            return self.columns
        return [*self.columns, "audio"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # A worker gets its own filesystem connection (a forked copy must not share the parent's).
        handle = self.handle if info is None else self.handle.detached()
        read = self._read_columns()
        drop_audio = self.decode_audio and self.columns is not None and "audio" not in self.columns
        schema = handle.schema
        json_cols = [(f.name, f.type) for f in schema if (read is None or f.name in read) and _has_json(f.type)]
        for shard, start, stop in self.pieces(worker_id, num_workers):
            for batch in handle.iter_shard(shard, read, self.read_batch_size, start=start, stop=stop):
                for row in batch.to_pylist():
                    for name, t in json_cols:
                        row[name] = _decode_json(row[name], t)
                    if self.decode_audio:
                        row.update(self._decode(row, handle))
                        if drop_audio:
                            del row["audio"]
                    yield row

    def _decode(self, row: dict[str, Any], handle: DatasetHandle) -> dict[str, Any]:
        audio = row.get("audio") or {}
        data = audio.get("bytes")
        if not data:
            raise ValueError(f"{handle.uri}: row {row.get('id')!r} has no stored audio bytes")
        try:
            array = decode_audio_bytes(data, self.sampling_rate)
        except Exception as exc:  # soundfile raises its own LibsndfileError (a RuntimeError)
            raise RuntimeError(f"{handle.uri}: cannot decode audio of row {row.get('id')!r}: {exc}") from exc
        return {"audio_array": array, "sampling_rate": self.sampling_rate}

    def __repr__(self) -> str:
        return (f"SpeechPairsIterableDataset({self.handle.uri!r}, rank={self.rank}/{self.world_size}, "
                f"epoch={self.epoch}, split={self.split!r})")


__all__ = ["SpeechPairsIterableDataset", "assign_pieces", "decode_audio_bytes", "shard_order"]
