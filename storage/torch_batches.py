"""What rows and batches of the torch loader hold: value conversion, audio decoding, padding, collate.

Two ways to a batch, with equal results for the same rows:
- per-row mode + `collate_speech_batch`: rows (dicts of Python values) are batched after the fact;
- batch mode (`torch_dataset(batch_size=N)`): `arrow_to_batch` converts a whole Arrow table by column
  (numbers straight from Arrow buffers to tensors, strings and binaries in one `to_pylist` per
  column) and decodes the batch's audio into one padded tensor, so a DataLoader worker hands over
  one ready batch per step instead of N rows, each converted value by value.

torch is imported at the top: import this module only where torch is installed.
"""

from __future__ import annotations

import io
import json
import math
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch

from schemas.arrow import SAMPLING_RATE

Convert = Callable[[Any], Any]
T = TypeVar("T")
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


def decode_or_raise(data: bytes | None, sampling_rate: int, where: str, row_id: Any) -> np.ndarray:
    """`decode_audio_bytes`, with errors that name the dataset and the row."""
    if not data:
        raise ValueError(f"{where}: row {row_id!r} has no stored audio bytes")
    try:
        return decode_audio_bytes(data, sampling_rate)
    except Exception as exc:  # soundfile raises its own LibsndfileError (a RuntimeError)
        raise RuntimeError(f"{where}: cannot decode audio of row {row_id!r}: {exc}") from exc


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
    """Clips of different lengths → (zero-padded float32 [batch, longest], int64 lengths [batch]).

    In a DataLoader worker the padded tensor is allocated in shared memory (as torch's own collate
    does), so handing it to the main process does not copy it once more.
    """
    from torch.utils.data import get_worker_info

    lengths = [len(a) for a in arrays]
    shape = (len(arrays), max(lengths, default=0))
    if get_worker_info() is not None and shape[0] * shape[1]:
        storage = torch.UntypedStorage._new_shared(shape[0] * shape[1] * 4)
        padded = torch.empty(0, dtype=torch.float32).set_(storage).view(shape)
        padded.zero_()
    else:
        padded = torch.zeros(shape, dtype=torch.float32)
    out = padded.numpy()
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return padded, torch.tensor(lengths, dtype=torch.int64)


def pass_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """`DataLoader(ds, batch_size=None, collate_fn=pass_batch)` for the batch mode: its batches are
    ready (tensors, lists, dicts), so the loader's default `default_convert` would only walk every
    string and dict of them again (~1,000 calls a batch of 16, a quarter of a worker's time)."""
    return batch


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


def column_to_batch(arr: pa.Array) -> Any:
    """One column of N rows as `collate_speech_batch` batches it, converted by column where it can be.

    Numbers and booleans without nulls come from the Arrow buffers (int64, float64 with NaN for a
    missing number, bool), strings and binaries are one list, a struct without nulls is batched field
    by field; anything else (json, lists, timestamps, null structs) goes value by value through the
    row converter and the collate, so both modes agree on every type.
    """
    t = arr.type
    if pa.types.is_integer(t) and arr.null_count == 0:
        return torch.from_numpy(np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64).copy())
    if pa.types.is_integer(t) or pa.types.is_floating(t):  # nulls → NaN, as the rows' NaN make float64
        return torch.from_numpy(np.array(arr.to_numpy(zero_copy_only=False), dtype=np.float64))
    if pa.types.is_boolean(t) and arr.null_count == 0:
        return torch.from_numpy(np.array(arr.to_numpy(zero_copy_only=False), dtype=np.bool_))
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        return arr.to_pylist()
    if pa.types.is_struct(t) and arr.null_count == 0 and t.num_fields:
        return {f.name: column_to_batch(child) for f, child in zip(t, arr.flatten(), strict=True)}
    values = arr.to_pylist()
    conv = _converter(t, batchable=False)
    return _collate_values([conv(v) for v in values] if conv else values)


def arrow_to_batch(table: pa.Table, *, keep: Sequence[str], decode_audio: bool, sampling_rate: int,
                   where: str) -> dict[str, Any]:
    """A table of N rows → one batch dict: the `keep` columns by `column_to_batch`, and with
    `decode_audio` the clips decoded here into "audio_array" (float32 [N, longest], zeros beyond
    each clip), "audio_lengths" (int64 [N]) and "sampling_rate" (int64 [N])."""
    out: dict[str, Any] = {name: column_to_batch(table.column(name).combine_chunks()) for name in keep}
    if decode_audio:
        audio = table.column("audio").combine_chunks()
        data = audio.flatten()[audio.type.get_field_index("bytes")].to_pylist()
        valid = audio.is_valid().to_pylist()
        ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
        arrays = [decode_or_raise(d if ok else None, sampling_rate, where, i)
                  for d, ok, i in zip(data, valid, ids, strict=True)]
        out["audio_array"], out["audio_lengths"] = pad_audio(arrays)
        out["sampling_rate"] = torch.full((table.num_rows,), sampling_rate, dtype=torch.int64)
    return pack_tensors(out)


def pack_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """Make the batch's 1-D tensors views into one buffer per dtype (in place; returns `batch`).

    A DataLoader worker hands each tensor storage over in its own shared-memory segment (about a
    millisecond each): a batch of every column holds ~35 number columns, so this is what passing a
    batch costs, unless the columns share a storage.
    """
    found: list[tuple[dict[str, Any], str, torch.Tensor]] = []

    def walk(d: dict[str, Any]) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(value, torch.Tensor) and value.dim() == 1:
                found.append((d, key, value))

    walk(batch)
    by_dtype: dict[torch.dtype, list[tuple[dict[str, Any], str, torch.Tensor]]] = {}
    for item in found:
        by_dtype.setdefault(item[2].dtype, []).append(item)
    for items in by_dtype.values():
        if len(items) < 2:
            continue
        buffer = torch.cat([t for _, _, t in items])
        offset = 0
        for d, key, t in items:
            d[key] = buffer[offset:offset + len(t)]
            offset += len(t)
    return batch


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def prefetched(make: Callable[[], Iterator[T]], depth: int = 2) -> Generator[T, None, None]:
    """The items of `make()`, produced up to `depth` ahead in a background thread.

    Reading (pyarrow releases the GIL, S3 waits on the network) then overlaps with what the caller
    does with each item (converting, decoding audio). Errors are raised in the caller; closing the
    generator early stops the thread at its next item.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in make():
                if not offer(item):
                    return
            offer(_DONE)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            offer(_Failed(exc))

    thread = threading.Thread(target=produce, name="speechpairs-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()


__all__ = ["arrow_to_batch", "collate_speech_batch", "column_to_batch", "decode_audio_bytes", "decode_or_raise",
           "pack_tensors", "pad_audio", "prefetched", "row_converters"]
