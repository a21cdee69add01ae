"""Small committed versions with chosen ids and corpora, built without the pipeline, for compose
and gc tests (each row a real FLAC clip, so verify, open_dataset and export treat them as real)."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import soundfile as sf

from schemas.arrow import ROW_SCHEMA, hf_features, rows_to_table, schema_to_b64
from schemas.manifest import Manifest, Stats
from schemas.records import AudioRef, Features, Generation, Message, Provenance, Row
from storage.layout import RunLayout, staging_prefix
from storage.objectstore import LocalStore, ObjectStore
from storage.shards import write_parquet_shard
from storage.versions import commit_version

SR = 16_000


def flac_tone(seconds: float, freq: float) -> bytes:
    """A sine tone as FLAC bytes: a real, distinct clip per (seconds, freq)."""
    t = np.arange(int(SR * seconds)) / SR
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR, format="FLAC")
    return buf.getvalue()


def rows_table(rows: Sequence[tuple[str, str]], run_id: str = "r") -> pa.Table:
    """One row per (id, corpus): the corpus goes in the `dataset` column, gender alternates."""
    out = []
    for i, (row_id, corpus) in enumerate(rows):
        audio = flac_tone(0.2 + 0.01 * i, 200.0 + 10 * i)
        gender = "female" if i % 2 == 0 else "male"
        out.append(Row(
            id=row_id, dataset=corpus, audio=AudioRef(bytes=audio, path=f"{i}.flac"), audio_uri=f"/c/{i}.wav",
            audio_sha256=hashlib.sha256(audio).hexdigest(), sampling_rate=SR, duration_s=0.2 + 0.01 * i,
            transcript="hi" if i % 3 else "", transcript_source="corpus", language="en", labels={},
            features=Features(duration_s=0.2), attributes={"gender": gender}, seed_description="s",
            prompt="What is said?", messages=[Message(role="user", content="q")], response=f"r{i}",
            generation=Generation(backend="template", seed=i, finish_reason="stop"),
            provenance=Provenance(pipeline_version="0", config_hash="c", bins_version="b", run_id=run_id)))
    return rows_to_table(out)


def table_stats(tables: Sequence[pa.Table]) -> Stats:
    """What the pipeline would have counted for these rows (no quarantine)."""
    rows = [r for t in tables for r in t.select(["duration_s", "transcript", "attributes"]).to_pylist()]
    genders = Counter(json.loads(r["attributes"])["gender"] for r in rows)
    return Stats(clips_in=len(rows), rows=len(rows), quarantined=0,
                 audio_hours=round(sum(r["duration_s"] for r in rows) / 3600, 6),
                 rows_without_transcript=sum(not r["transcript"] for r in rows),
                 attribute_counts={"gender": dict(genders.most_common())})


def commit_tables(store: ObjectStore, dataset: str, run_id: str, tables: Sequence[pa.Table], *,
                  layout1: bool = False) -> Manifest:
    """Commit one shard per table as the next version of `dataset`: at data keys (layout 2), or
    staged the old way and copied into the version prefix (`layout1`, what the code before data
    keys committed; on a LocalStore its manifest JSON loses the `layout` key, as old ones lack it)."""
    layout = RunLayout(staging_prefix(dataset, run_id))
    shards = [write_parquet_shard(store, f"{layout.staging}/shards/train-{i:05d}.parquet" if layout1
                                  else (lambda sha, i=i: layout.data_shard(i, sha)), t)
              for i, t in enumerate(tables)]
    manifest = commit_version(store, dataset=dataset, staged_shards=shards, staged_quarantine=[],
                              lineage={"run_id": run_id, "code_version": "0", "config_hash": "c",
                                       "bins_version": "b", "prompt_pool_hash": "p"},
                              stats=table_stats(tables), arrow_schema_b64=schema_to_b64(ROW_SCHEMA),
                              hf_features=hf_features(), config={"output": {"dataset": dataset}})
    if layout1 and isinstance(store, LocalStore):
        path = store.base / dataset / manifest.lineage.version / "manifest.json"
        path.write_text(path.read_text().replace('  "layout": 1,\n', ""))
    return manifest
