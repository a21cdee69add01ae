"""Parquet shard writing and per-shard completion markers.

A shard is written to a local temp file first so its sha256, size and row count are known
before upload; the upload is a single atomic object (multipart on S3), so a half-written shard
is never visible under its key. The marker is written after the shard, so marker ⇒ shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.manifest import ShardInfo
from storage.objectstore import NotFound, ObjectStore

log = logging.getLogger(__name__)

# Rows carry encoded audio (tens to hundreds of KB each): small row groups keep a streaming
# reader's memory bounded while still compressing the text columns well.
ROW_GROUP_ROWS = 100


def sha256_file(path: str | Path, chunk_size: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_parquet_shard(store: ObjectStore, key: str, table: pa.Table, *, compression: str = "zstd",
                        row_group_rows: int = ROW_GROUP_ROWS) -> ShardInfo:
    """Write `table` (schema and its metadata kept exactly) as one Parquet object at `key`.

    Returns ShardInfo(path=key, …); the commit step rewrites `path` relative to the version.
    """
    codec = None if compression in ("none", "", None) else compression
    fd, tmp_name = tempfile.mkstemp(prefix="speechpairs-shard-", suffix=".parquet")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # Non-"compliant" nested types keep list children named `item`, so the file's Arrow schema
        # equals ROW_SCHEMA exactly (every Parquet reader still reads the standard 3-level list).
        with pq.ParquetWriter(tmp, table.schema, compression=codec, store_schema=True,
                              use_compliant_nested_type=False) as writer:
            writer.write_table(table, row_group_size=max(1, row_group_rows))
        info = ShardInfo(path=key, rows=table.num_rows, bytes=tmp.stat().st_size, sha256=sha256_file(tmp))
        store.put_file(key, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("wrote shard %s (%d rows, %d bytes)", store.uri(key), info.rows, info.bytes)
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
