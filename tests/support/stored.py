"""A version's rows read straight from its files with pyarrow: the test oracle for every reader.

Audio stored once: a shard whose manifest entry names an audio file has null `audio.bytes`; the
oracle fills them from that file by id with a plain dict (independently of storage.audio_files).
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from schemas.manifest import Manifest
from storage.objectstore import ObjectStore
from storage.versions import file_key


def _read(store: ObjectStore, key: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
    fs, base = store.arrow_fs()
    return pq.read_table(f"{base}/{key}", filesystem=fs, columns=columns).to_pylist()  # type: ignore[no-any-return]


def stored_rows(store: ObjectStore, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Every row of the version by id, with its audio bytes (from the shard or its audio file)."""
    rows: dict[str, dict[str, Any]] = {}
    for shard in manifest.shards:
        table = _read(store, file_key(manifest, shard))
        if shard.audio is not None:
            audio = {r["id"]: r["audio"] for r in _read(store, file_key(manifest, shard.audio), ["id", "audio"])}
            for row in table:
                if row["audio"]["bytes"] is None:
                    row["audio"]["bytes"] = audio[row["id"]]["bytes"]
        rows.update((r["id"], r) for r in table)
    return rows
