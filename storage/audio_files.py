"""Audio stored once: a row shard whose ShardInfo names an audio file gets its `audio` bytes from it.

A run writes each shard's audio once, to a content-keyed audio file (`id`, `audio`, … columns; see
tasks/clip_cache.py), and the row shard keeps only `audio.path`. A later run that changes only the
LLM, the instructions, the bins or the describe settings reuses the file, and every version that
lists it shares its bytes. Readers never notice: they join the bytes back on `id` here, reading
only the audio file's row groups a batch needs (the audio file may hold more clips than the shard,
e.g. ones quarantined later at the LLM stage, or rows another version excluded).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Any, Self

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.arrow import AUDIO_TYPE

ID, AUDIO = "id", "audio"
_KEEP_GROUPS = 4  # row groups kept decoded: batches arrive in shard order, so neighbours hit


class AudioLookupError(LookupError):
    pass


class AudioLookup:
    """The `audio` values of an audio file by clip id, read by row group on demand."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str | None = None) -> None:
        self._fs, self._path, self.uri = fs, path, uri or path
        self._fh: Any = None
        self._pf: pq.ParquetFile | None = None
        self._rows: dict[str, int] | None = None
        self._starts: list[int] = []
        self._groups: OrderedDict[int, pa.Array] = OrderedDict()

    def _open(self) -> pq.ParquetFile:
        if self._pf is None:
            self._fh = self._fs.open_input_file(self._path)
            self._pf = pq.ParquetFile(self._fh)
            meta = self._pf.metadata
            starts, offset = [], 0
            for g in range(meta.num_row_groups):
                starts.append(offset)
                offset += meta.row_group(g).num_rows
            self._starts = starts
            ids = self._pf.read(columns=[ID]).column(ID).to_pylist()
            self._rows = {}
            for row, clip_id in enumerate(ids):
                self._rows.setdefault(clip_id, row)
        return self._pf

    def _group(self, g: int) -> pa.Array:
        hit = self._groups.get(g)
        if hit is not None:
            self._groups.move_to_end(g)
            return hit
        arr = self._open().read_row_group(g, columns=[AUDIO]).column(AUDIO).combine_chunks()
        self._groups[g] = arr
        while len(self._groups) > _KEEP_GROUPS:
            self._groups.popitem(last=False)
        return arr

    def take(self, ids: list[str]) -> pa.Array:
        """The audio values of `ids`, in their order (AudioLookupError names a missing id and the file)."""
        self._open()
        assert self._rows is not None
        # Runs of ids in one row group are taken at once (a batch in shard order touches one or two).
        pieces: list[pa.Array] = []
        run_group, run_rows = -1, list[int]()
        for clip_id in ids:
            row = self._rows.get(clip_id)
            if row is None:
                raise AudioLookupError(f"audio file {self.uri} has no clip {clip_id!r}: the version lists an audio "
                                       "file that does not hold its rows (run `speechpairs datasets verify`)")
            g = bisect.bisect_right(self._starts, row) - 1
            if g != run_group and run_rows:
                pieces.append(self._rows_of(run_group, run_rows))
                run_rows = []
            run_group = g
            run_rows.append(row - self._starts[g])
        if run_rows:
            pieces.append(self._rows_of(run_group, run_rows))
        if not pieces:
            return pa.array([], type=AUDIO_TYPE)
        joined = pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)
        return joined if joined.type == AUDIO_TYPE else joined.cast(AUDIO_TYPE)

    def _rows_of(self, g: int, rows: list[int]) -> pa.Array:
        """Rows `rows` of row group `g`: a slice (no copy) where they are consecutive, as a shard's
        rows usually are in the audio file written with it."""
        group = self._group(g)
        first = rows[0]
        if rows[-1] - first == len(rows) - 1 and rows == list(range(first, first + len(rows))):
            return group.slice(first, len(rows))
        return group.take(pa.array(rows, pa.int64()))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh, self._pf, self._groups = None, None, OrderedDict()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _prefer(own: pa.Array, joined: pa.Array) -> pa.Array:
    """`own` where it is set, else `joined`; without copying either in the usual all-or-none cases
    (a row shard's bytes are all null, its paths all set)."""
    if own.null_count == 0:
        return own
    if own.null_count == len(own):
        return joined
    return pc.if_else(pc.is_null(own), joined, own)


def fill_audio(batch: pa.RecordBatch | pa.Table, lookup: AudioLookup) -> Any:
    """`batch` with its `audio` column's bytes from `lookup`, joined on `id` (both columns must be there).

    The row shard's `audio.path` is kept (it names the clip's file for exports); only null bytes
    are filled, so a shard that carries some bytes itself keeps them."""
    names = batch.schema.names
    i = names.index(AUDIO)
    own = batch.column(i)
    if isinstance(own, pa.ChunkedArray):
        own = own.combine_chunks()
    joined = lookup.take(batch.column(names.index(ID)).to_pylist())
    own_bytes, own_path = own.field("bytes"), own.field("path")
    data, path = _prefer(own_bytes, joined.field("bytes")), _prefer(own_path, joined.field("path"))
    audio = pa.StructArray.from_arrays([data, path], fields=list(AUDIO_TYPE))
    field = batch.schema.field(i)
    return batch.set_column(i, field, audio) if isinstance(batch, pa.Table) else \
        pa.RecordBatch.from_arrays([audio if j == i else batch.column(j) for j in range(len(names))],
                                   schema=batch.schema)
