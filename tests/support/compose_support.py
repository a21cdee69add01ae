"""Small committed versions with chosen ids and corpora, built without the pipeline, for compose
and gc tests (each row a real FLAC clip, so verify, open_dataset and export treat them as real).

`commit_tables` writes rows with their own audio bytes (versions from before audio stored once);
`commit_split` writes them the way the pipeline does since: each shard's audio in a content-keyed
audio file with its clip index (tasks/clip_cache.py), the rows with null audio bytes naming it."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import soundfile as sf

from schemas.arrow import AUDIO_TYPE, ROW_SCHEMA, hf_features, rows_to_table, schema_to_b64
from schemas.manifest import Manifest, ShardInfo, Stats
from schemas.records import AudioRef, Features, Generation, Message, Provenance, Row
from storage.layout import RunLayout, audio_file_key, clip_index_key, staging_prefix
from storage.objectstore import LocalStore, ObjectStore
from storage.shards import write_marker, write_parquet_shard
from storage.versions import commit_version
from tasks.clip_cache import CLIP_FILE_SCHEMA, ClipIndex

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


def write_audio_file(store: ObjectStore, dataset: str, clip_key: str, tables: Sequence[pa.Table]) -> ShardInfo:
    """The audio file of `tables`' clips (their `id`, `audio`, `audio_sha256`; the cache columns
    null) and then its clip index, as a measuring shard task leaves them."""
    clips = pa.concat_tables(tables)
    n = clips.num_rows
    columns = {name: clips.column(name) if name in ("id", "audio", "audio_sha256") else pa.nulls(n, field.type)
               for name, field in zip(CLIP_FILE_SCHEMA.names, CLIP_FILE_SCHEMA, strict=True)}
    info = write_parquet_shard(store, lambda sha: audio_file_key(dataset, clip_key, sha),
                               pa.table(columns, schema=CLIP_FILE_SCHEMA))
    index = ClipIndex(key=clip_key, file=info, quarantine=[], refs_done=n, recordings_cut=0, segments=0)
    store.put_bytes(clip_index_key(dataset, clip_key), index.model_dump_json().encode())
    return info


def without_audio_bytes(table: pa.Table) -> pa.Table:
    """The rows as a row shard holds them since audio is stored once: `audio.path` kept, bytes null."""
    i = table.schema.get_field_index("audio")
    audio = table.column(i).combine_chunks()
    nulled = pa.StructArray.from_arrays([pa.nulls(len(audio), pa.binary()), audio.field("path")],
                                        fields=list(AUDIO_TYPE))
    return table.set_column(i, table.schema.field(i), nulled)


def clip_key_of(dataset: str, run_id: str, index: int) -> str:
    return hashlib.sha256(f"{dataset}/{run_id}/{index}".encode()).hexdigest()[:32]


def write_split_shard(store: ObjectStore, dataset: str, run_id: str, index: int, table: pa.Table, *,
                      extra: pa.Table | None = None, audio: ShardInfo | None = None,
                      marker: bool = True) -> ShardInfo:
    """Shard `index` of run `run_id` as the pipeline writes it: its audio file (a new one holding
    `table`'s clips and `extra`'s, a superset like clips quarantined at the LLM stage; or `audio`,
    one an earlier run wrote, reused as a clip-cache hit), the rows at their data key without
    audio bytes naming it, and (with `marker`) the completion marker that claims both."""
    if audio is None:
        audio = write_audio_file(store, dataset, clip_key_of(dataset, run_id, index),
                                 [table, *([extra] if extra is not None else [])])
    layout = RunLayout(staging_prefix(dataset, run_id))
    shard = write_parquet_shard(store, lambda sha: layout.data_shard(index, sha), without_audio_bytes(table))
    shard = shard.model_copy(update={"audio": audio})
    if marker:
        write_marker(store, layout.marker(index), {"index": index, "shard": shard.model_dump()})
    return shard


def commit_shards(store: ObjectStore, dataset: str, run_id: str, shards: Sequence[ShardInfo],
                  tables: Sequence[pa.Table]) -> Manifest:
    """Commit already written shards (`tables`: their rows, for the stats) as the next version."""
    return commit_version(store, dataset=dataset, staged_shards=list(shards), staged_quarantine=[],
                          lineage={"run_id": run_id, "code_version": "0", "config_hash": "c",
                                   "bins_version": "b", "prompt_pool_hash": "p"},
                          stats=table_stats(tables), arrow_schema_b64=schema_to_b64(ROW_SCHEMA),
                          hf_features=hf_features(), config={"output": {"dataset": dataset}})


def commit_split(store: ObjectStore, dataset: str, run_id: str, tables: Sequence[pa.Table], *,
                 extras: Sequence[pa.Table | None] | None = None) -> Manifest:
    """Commit one shard per table, written as the pipeline does with audio stored once (see
    write_split_shard; `extras[i]`: clips only shard i's audio file holds)."""
    extra = list(extras) if extras is not None else [None] * len(tables)
    shards = [write_split_shard(store, dataset, run_id, i, t, extra=e)
              for i, (t, e) in enumerate(zip(tables, extra, strict=True))]
    return commit_shards(store, dataset, run_id, shards, tables)
