"""A 200k-row clip list streamed by ingest: memory stays flat whatever the file size (tracemalloc makes
this a slow test, so it lives with the integration layer)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

from schemas.config import SourceConfig
from tasks.ingest import iter_refs


def test_manifest_is_read_lazily(tmp_path: Path) -> None:
    """200k rows: iterating refs keeps memory flat (one row at a time), independent of file size."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(200_000):
            f.write(json.dumps({"path": f"clips/{i:07d}.wav", "transcript": "word " * 20, "spk": str(i % 50)}) + "\n")
    small = tmp_path / "small.jsonl"
    small.write_text(path.read_text().split("\n", 100)[0] + "\n")
    assert len(list(iter_refs([SourceConfig(path=str(small), dataset="big")]))) == 1  # warm caches first
    refs = iter_refs([SourceConfig(path=str(path), dataset="big")])
    tracemalloc.start()
    count = 0
    for _ in refs:
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 200_000
    assert peak < 1_000_000, f"peak {peak} bytes while streaming a {path.stat().st_size} byte manifest"
