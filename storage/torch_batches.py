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
import soundfile as sf
import torch

from schemas.arrow import SAMPLING_RATE
from storage.batch_memory import Lease, WorkerMemory

try:  # dr_flac: the faster FLAC decoder where its wheel exists (see fast_flac_frames)
    import miniaudio as _miniaudio

    if not hasattr(_miniaudio.lib, "ma_dr_flac_read_pcm_frames_f32"):  # pragma: no cover - another build
        _miniaudio = None
except ImportError:  # pragma: no cover - Linux arm64
    _miniaudio = None

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


Encoded = bytes | memoryview  # a clip's stored bytes, or a view of them in the Arrow buffer they were read into


def fast_flac_frames(data: Encoded, sampling_rate: int) -> int | None:
    """The frame count of a 16-bit mono FLAC stream at `sampling_rate` (what speechpairs stores),
    read from its STREAMINFO header, when dr_flac (miniaudio) is there to decode it; else None.

    dr_flac decodes such a clip ~40% faster than libsndfile, with the same samples (lossless,
    both scale by 1/32768); anything else (other widths, channels or rates, no length in the
    header, no miniaudio: it has no Linux arm64 wheel) is decoded by libsndfile.
    """
    if _miniaudio is None or len(data) < 42 or data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        return None
    x = int.from_bytes(data[18:26], "big")  # rate 20 bits, channels-1 3, bits-1 5, frames 36
    rate, channels, bits, frames = x >> 44, ((x >> 41) & 7) + 1, ((x >> 36) & 31) + 1, x & ((1 << 36) - 1)
    ok = rate == sampling_rate and channels == 1 and bits == 16 and 0 < frames < 2**31
    return frames if ok else None


def _flac16_into(data: Encoded, row: np.ndarray) -> int:
    """Decode a `fast_flac_frames` clip straight into `row` (float32, contiguous); the frames written."""
    assert _miniaudio is not None
    ffi, lib = _miniaudio.ffi, _miniaudio.lib
    flac = lib.ma_dr_flac_open_memory(ffi.from_buffer(data), len(data), ffi.NULL)
    if not flac:
        raise _miniaudio.DecodeError("not a decodable FLAC stream")
    try:
        out = ffi.cast("float *", ffi.from_buffer(row, require_writable=True))
        return int(lib.ma_dr_flac_read_pcm_frames_f32(flac, len(row), out))
    finally:
        lib.ma_dr_flac_close(flac)


def decode_audio_bytes(data: Encoded, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Encoded audio (FLAC/WAV/…) → float32 mono array at `sampling_rate` (soxr if resampling)."""
    frames = fast_flac_frames(data, sampling_rate)
    if frames is not None:
        out = np.empty(frames, dtype=np.float32)
        return out[: _flac16_into(data, out)]
    samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if sr != sampling_rate:
        import soxr

        mono = soxr.resample(mono, sr, sampling_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _no_bytes(where: str, row_id: Any) -> ValueError:
    return ValueError(f"{where}: row {row_id!r} has no stored audio bytes")


def _undecodable(where: str, row_id: Any, exc: Exception) -> RuntimeError:
    return RuntimeError(f"{where}: cannot decode audio of row {row_id!r}: {exc}")


def decode_or_raise(data: bytes | None, sampling_rate: int, where: str, row_id: Any) -> np.ndarray:
    """`decode_audio_bytes`, with errors that name the dataset and the row."""
    if not data:
        raise _no_bytes(where, row_id)
    try:
        return decode_audio_bytes(data, sampling_rate)
    except Exception as exc:  # LibsndfileError (a RuntimeError), miniaudio.DecodeError
        raise _undecodable(where, row_id, exc) from exc


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


def _new_storage(nbytes: int) -> torch.UntypedStorage:
    """`nbytes` uninitialised. In a DataLoader worker in shared memory (as torch's own collate
    allocates), so handing it to the main process copies nothing: one file descriptor passes.
    Shared memory is a new file, so it reads as zeros (`is_shared()`) until written."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is not None and nbytes:
        return torch.UntypedStorage._new_shared(nbytes)
    return torch.UntypedStorage(nbytes)


def _view(storage: torch.UntypedStorage, byte_offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A `dtype` tensor of `shape` over `storage` from `byte_offset` (a multiple of the item size)."""
    empty = torch.empty(0, dtype=dtype)
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return empty.set_(storage, byte_offset // empty.element_size(), shape, strides)


def pad_audio(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of different lengths → (zero-padded float32 [batch, longest], int64 lengths [batch])."""
    lengths = [len(a) for a in arrays]
    shape = (len(arrays), max(lengths, default=0))
    padded = _view(_new_storage(shape[0] * shape[1] * 4), 0, torch.float32, shape)
    out = padded.numpy()
    for i, a in enumerate(arrays):  # each sample written once: the clip, then zeros past its end
        out[i, : len(a)] = a
        out[i, len(a):] = 0.0
    return padded, torch.tensor(lengths, dtype=torch.int64)


Fill = Callable[[np.ndarray], int]


def _clip_reader(data: Encoded, sampling_rate: int) -> tuple[int, Fill] | np.ndarray:
    """How one clip gets into its row of a batch: (its length from the header, a function that
    decodes it into a row and returns the frames written), or, where the header cannot say (several
    channels, another rate), the clip decoded."""
    frames = fast_flac_frames(data, sampling_rate)
    if frames is not None:
        return frames, lambda row: _flac16_into(data, row)
    f = sf.SoundFile(io.BytesIO(data))
    if f.channels == 1 and f.samplerate == sampling_rate and 0 < f.frames < 2**31:
        def fill(row: np.ndarray) -> int:
            with f:
                return len(f.read(len(row), dtype="float32", out=row))

        return f.frames, fill
    f.close()
    return decode_audio_bytes(data, sampling_rate)


Clip = tuple[int, Fill] | np.ndarray  # see _clip_reader


def _open_clips(data: Sequence[Encoded | None], ids: Sequence[Any], sampling_rate: int, where: str) -> list[Clip]:
    """Each clip's `_clip_reader` (errors name the row): their lengths are known before decoding."""
    clips: list[Clip] = []
    for d, row_id in zip(data, ids, strict=True):
        if not d:
            raise _no_bytes(where, row_id)
        try:
            clips.append(_clip_reader(d, sampling_rate))
        except Exception as exc:  # LibsndfileError (a RuntimeError), a bad header
            raise _undecodable(where, row_id, exc) from exc
    return clips


def _clip_frames(clip: Clip) -> int:
    return len(clip) if isinstance(clip, np.ndarray) else clip[0]


def _fill_clips(clips: Sequence[Clip], out: np.ndarray, ids: Sequence[Any], where: str, *,
                zeroed: bool) -> list[int]:
    """Decode clip i into row i of `out` (float32 [N, ≥ longest]), zeros past its end; the lengths.

    A mono clip stored at the loader's rate (what speechpairs writes) is decoded in place: no
    per-clip array, no copy; any other was decoded by `_clip_reader` and is copied in. With `zeroed`
    (`out` is new shared memory, already zeros) the padding is left untouched: its pages are then
    never written, so the worker neither faults them in nor fills them (the padding is about half
    of a batch of speech clips of mixed lengths)."""
    lengths = []
    for i, (clip, row_id) in enumerate(zip(clips, ids, strict=True)):
        if isinstance(clip, np.ndarray):
            n = len(clip)
            out[i, :n] = clip
        else:
            try:
                n = clip[1](out[i, : clip[0]])
            except Exception as exc:  # LibsndfileError, miniaudio.DecodeError
                raise _undecodable(where, row_id, exc) from exc
        if not zeroed:
            out[i, n:] = 0.0
        lengths.append(n)
    return lengths


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
                   where: str, memory: WorkerMemory | None = None) -> dict[str, Any]:
    """A table of N rows → one batch dict: the `keep` columns by `column_to_batch`, and with
    `decode_audio` the clips decoded here into "audio_array" (float32 [N, longest], zeros beyond
    each clip), "audio_lengths" (int64 [N]) and "sampling_rate" (int64 [N]).

    Every tensor of the batch is a view into one storage (`pack_tensors`): the audio first, decoded
    in place, then the number columns. With `memory` (a DataLoader worker's), that storage is one of
    the worker's reused slots where one is free, and the batch is a `LeasedBatch`."""
    n = table.num_rows
    out: dict[str, Any] = {name: column_to_batch(table.column(name).combine_chunks()) for name in keep}
    clips: list[Clip] = []
    ids: list[Any] = []
    width = 0
    if decode_audio:
        ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * n
        clips = _open_clips(audio_views(table.column("audio")), ids, sampling_rate, where)
        width = max(map(_clip_frames, clips), default=0)
        out["audio_array"] = None  # placed first in the storage, below
        out["audio_lengths"] = torch.zeros(n, dtype=torch.int64)  # set once decoded
        out["sampling_rate"] = torch.full((n,), sampling_rate, dtype=torch.int64)
    lease: Lease | None = None

    def new_storage(nbytes: int) -> torch.UntypedStorage:
        nonlocal lease
        if memory is None or not nbytes:
            return _new_storage(nbytes)
        storage, lease = memory.storage(nbytes)
        return storage

    storage = pack_tensors(out, head_bytes=n * width * 4, new_storage=new_storage)
    try:
        if decode_audio:
            out["audio_array"] = _view(storage, 0, torch.float32, (n, width))
            zeroed = lease is None and storage.is_shared()  # new shared memory reads as zeros
            lengths = _fill_clips(clips, out["audio_array"].numpy(), ids, where, zeroed=zeroed)
            out["audio_lengths"].copy_(torch.tensor(lengths, dtype=torch.int64))
    except BaseException:
        if memory is not None and lease is not None:
            memory.release(lease)
        raise
    return out if memory is None or lease is None else memory.leased(out, lease)


def audio_views(audio: pa.ChunkedArray) -> list[memoryview | None]:
    """Each row's stored audio bytes (`audio` struct column) as a view into the Arrow buffer pyarrow
    read them into, None where missing: decoding reads them there, where a list of Python bytes would
    copy every clip once more (~70 KB a row) and allocate it."""
    out: list[memoryview | None] = []
    for chunk in audio.chunks:
        data = chunk.flatten()[chunk.type.get_field_index("bytes")]  # the struct's nulls included
        if len(data) == 0:
            continue
        if data.null_count == len(data):
            out.extend([None] * len(data))
            continue
        _, offsets_buf, values_buf = data.buffers()
        width = np.int64 if pa.types.is_large_binary(data.type) else np.int32
        offsets = np.frombuffer(offsets_buf, dtype=width, count=len(data) + 1, offset=data.offset * width().itemsize)
        values = memoryview(values_buf) if values_buf is not None else memoryview(b"")
        valid = data.is_valid().to_pylist() if data.null_count else [True] * len(data)
        bounds = offsets.tolist()
        out.extend(values[bounds[i]:bounds[i + 1]] if ok else None for i, ok in enumerate(valid))
    return out


def pack_tensors(batch: dict[str, Any], head_bytes: int = 0,
                 new_storage: Callable[[int], torch.UntypedStorage] | None = None) -> torch.UntypedStorage:
    """Make every 1-D tensor of `batch` (nested dicts too) a view into one storage (from
    `new_storage(nbytes)`, by default new memory), after its first `head_bytes` (left for the
    caller); returns the storage.

    A DataLoader worker hands each tensor storage over as its own shared-memory segment (a file
    descriptor passed through a socket each, about a millisecond of both processes): a batch of
    every column holds ~35 number columns, so this is what passing a batch costs, unless the
    columns share one storage.
    """
    found: list[tuple[dict[str, Any], str, torch.Tensor]] = []

    def walk(d: dict[str, Any]) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(value, torch.Tensor) and value.dim() == 1:
                found.append((d, key, value))

    walk(batch)
    offsets, end = [], head_bytes
    for _, _, t in found:
        end = -(-end // 8) * 8  # every view starts 8-byte aligned
        offsets.append(end)
        end += t.numel() * t.element_size()
    storage = (new_storage or _new_storage)(end)
    for (d, key, t), offset in zip(found, offsets, strict=True):
        view = _view(storage, offset, t.dtype, (t.numel(),))
        view.copy_(t)
        d[key] = view
    return storage


def preload_worker_imports(decode_audio: bool) -> None:
    """Import, in the process that forks the DataLoader workers, what they would import lazily.

    A forked worker starts from its parent's modules; a module it imports itself is imported again
    by every worker of every epoch (non-persistent workers are forked anew). pyarrow imports pandas
    (when installed) at its first compute call (`take`, `if_else`, used by the audio join): about
    half of a worker's CPU over a short epoch (measured, this sandbox compiles every import).
    """
    import pyarrow.compute as pc

    pc.take(pa.array([0]), pa.array([0]))
    if decode_audio:
        import soxr  # noqa: F401


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


__all__ = ["arrow_to_batch", "audio_views", "collate_speech_batch", "column_to_batch", "decode_audio_bytes", "decode_or_raise",
           "pack_tensors", "pad_audio", "prefetched", "preload_worker_imports", "row_converters"]
