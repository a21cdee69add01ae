"""Parquet shard writing and per-shard completion markers.

A shard is written to a local temp file first so its sha256, size and row count are known
before upload; the key may depend on the sha256 (a shard task's data key carries it, see
storage/layout.py), and the upload sends the checksum along where the store can check it (S3).
The upload is a single atomic object (multipart on S3), so a half-written shard is never visible
under its key. The marker is written after the shard, so marker ⇒ shard; the commit only
references the uploaded object (storage/versions.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.manifest import ShardInfo
from storage.objectstore import NotFound, ObjectStore

log = logging.getLogger(__name__)

# A fixed key, or the key as a function of the finished file's sha256 (hex).
ShardKey = str | Callable[[str], str]

# Rows carry encoded audio (tens to hundreds of KB each): small row groups keep a streaming
# reader's memory bounded while still compressing the text columns well.
ROW_GROUP_ROWS = 100


def sha256_file(path: str | Path, chunk_size: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class ParquetShardWriter:
    """Streams tables into one Parquet object at `key`: memory holds a batch, never the shard.

    Rows go to a local temp file (schema and its metadata kept exactly); `close()` uploads it as
    one atomic object (at `key(sha256)` when `key` is a function) and returns its ShardInfo.
    Leaving the `with` block on an exception discards the temp file and uploads nothing.
    """

    def __init__(self, store: ObjectStore, key: ShardKey, schema: pa.Schema, *, compression: str = "zstd",
                 row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.store, self.key, self.schema = store, key, schema
        self._codec = None if compression in ("none", "", None) else compression
        self._row_group_rows = max(1, row_group_rows)
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self.rows = 0

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            fd, name = tempfile.mkstemp(prefix="speechpairs-shard-", suffix=".parquet")
            os.close(fd)
            self._tmp = Path(name)
            # Non-"compliant" nested types keep list children named `item`, so the file's Arrow
            # schema equals ROW_SCHEMA exactly (every Parquet reader still reads the 3-level list).
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression=self._codec, store_schema=True,
                                            use_compliant_nested_type=False)
        return self._writer

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._open().write_table(table.cast(self.schema), row_group_size=self._row_group_rows)
            self.rows += table.num_rows

    def close(self, *, allow_empty: bool = False) -> ShardInfo | None:
        """Upload and describe the shard; None (nothing uploaded) if empty and not `allow_empty`."""
        if self._writer is None and not allow_empty:
            return None
        try:
            self._open().close()
            assert self._tmp is not None
            digest = sha256_file(self._tmp)
            key = self.key(digest) if callable(self.key) else self.key
            info = ShardInfo(path=key, rows=self.rows, bytes=self._tmp.stat().st_size, sha256=digest)
            self.store.put_file(key, self._tmp, sha256=digest)
        finally:
            self.abort()
        log.debug("wrote shard %s (%d rows, %d bytes)", self.store.uri(info.path), info.rows, info.bytes)
        return info

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, pa.ArrowException):
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._writer, self._tmp = None, None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.abort()


def write_parquet_shard(store: ObjectStore, key: ShardKey, table: pa.Table, *, compression: str = "zstd",
                        row_group_rows: int = ROW_GROUP_ROWS) -> ShardInfo:
    """Write `table` as one Parquet object at `key` (an empty table still makes a valid file).

    Returns ShardInfo(path=<the key written>, …), what a completion marker records.
    """
    with ParquetShardWriter(store, key, table.schema, compression=compression,
                            row_group_rows=row_group_rows) as writer:
        writer.write(table)
        info = writer.close(allow_empty=True)
    assert info is not None
    return info


def write_marker(store: ObjectStore, key: str, payload: dict[str, Any]) -> None:
    """Completion marker (JSON). Write it only after the shard it describes is stored."""
    store.put_bytes(key, json.dumps(payload, sort_keys=True, indent=2, default=str).encode())


def read_marker(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The marker's payload, or None if absent or unreadable (then the shard is simply redone)."""
    try:
        data = store.get_bytes(key)
    except NotFound:
        return None
    try:
        payload = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("ignoring unreadable completion marker %s", store.uri(key))
        return None
    if not isinstance(payload, dict):
        log.warning("ignoring completion marker %s: not a JSON object", store.uri(key))
        return None
    return payload
