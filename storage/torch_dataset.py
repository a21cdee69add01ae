"""A torch `IterableDataset` over one committed version: sharded across ranks and workers.

torch is a dev/training dependency, not a runtime one: this module imports it at the top, so
import it only where torch is installed (`DatasetHandle.torch_dataset()` imports it lazily, and
`storage/__init__` never does).

    ds = open_dataset("s3://bucket/prefix/demo@stable").torch_dataset(world_size=ws, rank=rank, seed=0)
    loader = DataLoader(ds, batch_size=8, num_workers=4, collate_fn=collate_speech_batch)
    for epoch in range(epochs):
        ds.set_epoch(epoch)            # before creating the epoch's iterator (not with persistent_workers)
        for batch in loader: ...       # batch["audio_array"]: [8, longest] float32, batch["audio_lengths"]

Which batching to use:
- `batch_size=None`: one row at a time, as a dict (json columns decoded to dicts).
- `batch_size=N, collate_fn=collate_speech_batch`: whenever audio is decoded (clips differ in
  length): zero-padded audio plus true lengths; numbers become tensors, dicts are batched key by
  key, everything else (strings, None, lists, json dicts' values) stays a list. Works on any row.
- `batch_size=N` with torch's default collate: for rows without decoded audio, built with
  `batchable=True` (`torch_dataset(decode_audio=False, batchable=True)`): every value is then one
  the default collate can batch (see `SpeechPairsIterableDataset`).
Either way a missing numeric value (a feature that was not measured, an unset sampling
parameter) is NaN, never None.

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
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
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


Convert = Callable[[Any], Any]
_NAN = math.nan


def _nan_if_none(value: Any) -> Any:
    return _NAN if value is None else value


def _converter(t: pa.DataType, batchable: bool) -> Convert | None:
    """What one Arrow-typed value becomes in a row (None: left as pyarrow gives it).

    Always: a null number is NaN and `json` text is decoded. With `batchable`, every value is one
    torch's default collate can batch: a null string is "", `json` stays JSON text, a timestamp is
    ISO-8601 text, a list (messages, segments: their length varies) is JSON text, a null struct is a
    struct of nulls (so converted like its fields).
    """
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return _nan_if_none
    if t == pa.json_():
        if batchable:
            return lambda v: "" if v is None else v
        return lambda v: None if v is None else json.loads(v)
    if pa.types.is_struct(t):
        fields = [(f.name, _converter(f.type, batchable)) for f in t]
        if all(conv is None for _, conv in fields):
            return None

        def struct(value: Any) -> Any:
            if value is None:
                if not batchable:
                    return None
                value = {}
            return {name: (conv(value.get(name)) if conv else value.get(name)) for name, conv in fields}

        return struct
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if batchable:
            return lambda v: "" if v is None else json.dumps(v, ensure_ascii=False, default=str)
        item = _converter(t.value_type, batchable)
        if item is None:
            return None
        return lambda v: None if v is None else [item(x) for x in v]
    if not batchable:
        return None
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return lambda v: "" if v is None else v.isoformat()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return lambda v: b"" if v is None else v
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return lambda v: "" if v is None else v
    return None


def row_converters(schema: pa.Schema, columns: list[str] | None, batchable: bool) -> list[tuple[str, Convert]]:
    """(column, converter) for the columns read whose values need converting."""
    out = []
    for f in schema:
        if columns is not None and f.name not in columns:
            continue
        conv = _converter(f.type, batchable)
        if conv is not None:
            out.append((f.name, conv))
    return out


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
    attributes decoded to dicts; a null number is NaN) and, with `decode_audio`, "audio_array"
    (float32, mono, `sampling_rate` Hz) and "sampling_rate". Batch it with `batch_size=None`, with
    `collate_fn=collate_speech_batch` (pads the audio), or, with `batchable=True` and no decoded
    audio, with torch's default collate: then a null string is "", json columns stay JSON text,
    timestamps are ISO-8601 text and list columns (messages, segments) are JSON text.
    """

    def __init__(self, source: DatasetHandle | str, *, version: str | None = None, s3: S3Config | None = None,
                 columns: list[str] | None = None, world_size: int = 1, rank: int = 0,
                 shuffle_shards: bool = True, seed: int = 0, decode_audio: bool = True,
                 sampling_rate: int = SAMPLING_RATE, split: Split = "auto", read_batch_size: int = 64,
                 batchable: bool = False) -> None:
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
        self.batchable = batchable

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
        converters = row_converters(handle.schema, read, self.batchable)
        for shard, start, stop in self.pieces(worker_id, num_workers):
            for batch in handle.iter_shard(shard, read, self.read_batch_size, start=start, stop=stop):
                for row in batch.to_pylist():
                    if self.decode_audio:  # from the bytes as stored, before any conversion
                        row.update(self._decode(row, handle))
                        if drop_audio:
                            del row["audio"]
                    for name, convert in converters:
                        if name in row:
                            row[name] = convert(row[name])
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


def _collate_values(values: list[Any]) -> Any:
    if values and all(isinstance(v, Mapping) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _collate_values([v.get(k) for v in values]) for k in keys}
    if values and all(isinstance(v, bool | np.bool_) for v in values):
        return torch.tensor(values, dtype=torch.bool)
    if values and all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
                      for v in values):
        floating = any(isinstance(v, float | np.floating) for v in values)
        return torch.tensor(values, dtype=torch.float64 if floating else torch.int64)
    if values and all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
        return torch.from_numpy(np.stack(values))
    return list(values)


def pad_audio(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of different lengths → (zero-padded float32 [batch, longest], int64 lengths [batch])."""
    lengths = [len(a) for a in arrays]
    out = np.zeros((len(arrays), max(lengths, default=0)), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out), torch.tensor(lengths, dtype=torch.int64)


def collate_speech_batch(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`DataLoader(ds, batch_size=N, collate_fn=collate_speech_batch)`: batches any row of this dataset.

    "audio_array" (clips differ in length) → zero-padded float32 tensor [N, longest] plus
    "audio_lengths" (int64 [N], the true sample counts: mask with `arange(T) < lengths[:, None]`).
    Numbers → tensors (float64 when any is a float, NaN kept for missing values; int64 otherwise);
    dicts (struct and json columns) are batched key by key over the union of their keys (a key a row
    lacks is None); strings, bytes, None, lists and timestamps stay Python lists in row order.
    """
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(key) for row in rows]
        if key == "audio_array":
            out["audio_array"], out["audio_lengths"] = pad_audio(values)  # type: ignore[arg-type]
        else:
            out[key] = _collate_values(values)
    return out


__all__ = ["SpeechPairsIterableDataset", "assign_pieces", "collate_speech_batch", "decode_audio_bytes", "pad_audio",
           "row_converters", "shard_order"]
