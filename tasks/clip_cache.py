"""The clip cache: a shard's clips measured and encoded once, reused by every run that would measure
them the same way (audio stored once, features measured once).

The cache key is a hash of what decides the measured clips: the shard's clip references, the corpus
fingerprint (a changed file is a new corpus), the sources/audio/features/segment settings, the
output audio format and the extractor versions (describe's excepted). The LLM, the instructions,
the bins and the describe settings are not in it, so a run that changes only those finds its
shards' clips here: no decode, no DSP, no Whisper, no classifier, and no audio bytes written.

One audio file per key (`<dataset>/audio/<key>-<sha16>.parquet`, immutable) holds, in measuring
order, each measured clip's encoded audio and audio checksum (what row shards reference and readers
join, storage/audio_files.py) and what describing needs again: the clip record and its
measurements. The index (`<key>.json`, written after the file) names the file and holds the
quarantine rows of the clips that never got measured, with the shard's segmentation counts. A
shard whose measuring quarantined clips a re-run retries (transient failures) writes no index, so
the next run measures it afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from pydantic import BaseModel

from schemas.arrow import AUDIO_TYPE
from schemas.config import RunConfig
from schemas.manifest import ShardInfo
from schemas.records import Clip, Features, QuarantineRow, Segment
from storage.layout import audio_file_key, clip_index_key
from storage.objectstore import NotFound, ObjectStore
from storage.shards import ParquetShardWriter
from tasks.audio import DecodedAudio, audio_name, encode_audio
from tasks.commit_gate import transient_count
from tasks.measure import Measured
from tasks.plan import ShardPlan
from tasks.run import RunContext
from tasks.tally import ShardTally, replay_quarantine

log = logging.getLogger("speechpairs.pipeline")

# Bumped when what the file holds or how a clip is measured changes outside the extractor versions.
CLIP_CACHE_VERSION = "1"

CLIP_FILE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("audio", AUDIO_TYPE),
    pa.field("audio_sha256", pa.string()),
    pa.field("clip", pa.string()),      # the Clip record (JSON, without embedded audio bytes)
    pa.field("measured", pa.string()),  # features, transcript, segments, predictions … (JSON)
    pa.field("batch", pa.int32()),      # the measuring batch (replayed as one)
    # The shard's counts once this row's batch was measured (progress replays them).
    pa.field("refs_done", pa.int64()),
    pa.field("recordings_cut", pa.int64()),
    pa.field("segments", pa.int64()),
    pa.field("quarantined", pa.int64()),
])


class ClipIndex(BaseModel):
    """A finished clip cache: its audio file and what measuring left besides the measured clips."""

    version: str = CLIP_CACHE_VERSION
    key: str
    file: ShardInfo
    quarantine: list[QuarantineRow]
    refs_done: int
    recordings_cut: int
    segments: int


def clip_key(config: RunConfig, ctx: RunContext, plan: ShardPlan) -> str:
    """The key of shard `plan`'s measured clips (see the module docstring)."""
    settings = config.model_dump(mode="json", include={"sources", "audio", "features", "segment"})
    payload = {
        "version": CLIP_CACHE_VERSION,
        "refs": [r.model_dump(mode="json") for r in plan.refs],
        "corpus": ctx.corpus_fingerprint,
        "settings": settings,
        "format": config.output.audio_format,
        "extractors": {k: v for k, v in ctx.extractor_versions.items() if k != "describe"},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load_index(store: ObjectStore, dataset: str, key: str) -> ClipIndex | None:
    """The finished clip cache of `key`, or None (absent, unreadable, or its audio file gone)."""
    try:
        index = ClipIndex.model_validate_json(store.get_bytes(clip_index_key(dataset, key)))
    except NotFound:
        return None
    except ValueError as exc:
        log.warning("ignoring unreadable clip cache index %s: %s", store.uri(clip_index_key(dataset, key)), exc)
        return None
    if index.version != CLIP_CACHE_VERSION or index.key != key:
        return None
    try:
        if store.size(index.file.path) != index.file.bytes:
            return None
    except NotFound:  # collected by gc since: measure again
        return None
    return index


def _measured_json(m: Measured) -> str:
    a = m.audio
    return json.dumps({
        "features": m.features.model_dump(mode="json"), "transcript": m.transcript,
        "transcript_source": m.transcript_source, "language": m.language,
        "segments": [s.model_dump(mode="json") for s in m.segments],
        "predictions": {k: list(v) for k, v in m.predictions.items()}, "speech": m.speech,
        "sampling_rate": a.sampling_rate, "source_sampling_rate": a.source_sampling_rate,
        "source_channels": a.source_channels, "duration_s": a.duration_s, "clipping_ratio": a.clipping_ratio,
    })


class ClipRecorder:
    """Writes a shard's measured clips to a new clip cache as they pass by (a cache miss)."""

    def __init__(self, store: ObjectStore, dataset: str, key: str, config: RunConfig, acc: ShardTally) -> None:
        self.store, self.dataset, self.key, self.acc = store, dataset, key, acc
        self.fmt = config.output.audio_format
        self.writer = ParquetShardWriter(store, lambda sha: audio_file_key(dataset, key, sha), CLIP_FILE_SCHEMA,
                                         compression=config.output.compression)
        self.quarantine: list[QuarantineRow] = []
        self.batches = 0

    def record(self, batches: Iterable[list[Measured]]) -> Iterator[list[Measured]]:
        """Pass `batches` on, writing each first; quarantine rows added while a batch was cut and
        measured are the cache's (describing and the LLM add theirs after the batch is passed on)."""
        it = iter(batches)
        while True:
            start = len(self.acc.quarantine)
            try:
                batch = next(it)
            except StopIteration:
                self.quarantine.extend(self.acc.quarantine[start:])
                return
            self.quarantine.extend(self.acc.quarantine[start:])
            self._write(batch)
            yield batch

    def _write(self, batch: list[Measured]) -> None:
        t0 = time.perf_counter()
        acc, n = self.acc, len(batch)
        audio = [{"bytes": encode_audio(m.audio.samples, m.audio.sampling_rate, self.fmt),
                  "path": audio_name(m.clip.id, self.fmt)} for m in batch]
        columns: dict[str, Any] = {
            "id": [m.clip.id for m in batch], "audio": audio, "audio_sha256": [m.audio.sha256 for m in batch],
            "clip": [m.clip.model_dump_json(exclude={"audio_bytes"}) for m in batch],
            "measured": [_measured_json(m) for m in batch], "batch": [self.batches] * n,
            "refs_done": [acc.refs_done] * n, "recordings_cut": [acc.recordings_cut] * n,
            "segments": [acc.segments] * n, "quarantined": [len(self.quarantine)] * n,
        }
        self.writer.write(pa.table(columns, schema=CLIP_FILE_SCHEMA))
        self.batches += 1
        acc.stage_seconds["encode"] += time.perf_counter() - t0

    def finish(self) -> ShardInfo:
        """Upload the audio file, then the index (unless measuring hit transient failures)."""
        t0 = time.perf_counter()
        info = self.writer.close(allow_empty=True)
        assert info is not None
        acc = self.acc
        if transient_count({q.reason_code.value: 1 for q in self.quarantine}):
            log.info("shard %05d: not caching its measured clips (transient failures; a re-run measures them)",
                     acc.shard)
        else:
            index = ClipIndex(key=self.key, file=info, quarantine=self.quarantine, refs_done=acc.refs_done,
                              recordings_cut=acc.recordings_cut, segments=acc.segments)
            self.store.put_bytes(clip_index_key(self.dataset, self.key), index.model_dump_json().encode())
        acc.stage_seconds["write"] += time.perf_counter() - t0
        return info

    def abort(self) -> None:
        self.writer.abort()


def replay(store: ObjectStore, index: ClipIndex, acc: ShardTally, batch_size: int) -> Iterator[list[Measured]]:
    """The cached shard's measured clips batch by batch, with its quarantine rows and counts replayed
    into `acc` as the measuring run saw them (a cache hit: nothing decoded or measured). The audio
    bytes stay unread unless a clip with several spans needs its samples to be described again."""
    fs, base = store.arrow_fs()
    done_q = 0
    t0 = time.perf_counter()
    with fs.open_input_file(f"{base}/{index.file.path}") as fh:
        pf = pq.ParquetFile(fh)
        audio = _LazyAudio(pf)
        columns = [n for n in CLIP_FILE_SCHEMA.names if n != "audio"]
        pending: list[dict[str, Any]] = []
        row_no = 0
        for record_batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for row in record_batch.to_pylist():
                row["row"] = row_no
                row_no += 1
                if pending and row["batch"] != pending[-1]["batch"]:
                    done_q = _counts(acc, index, pending[-1], done_q)
                    acc.stage_seconds["clip_cache"] += time.perf_counter() - t0
                    yield [_measured(r, audio) for r in pending]
                    t0 = time.perf_counter()
                    pending = []
                pending.append(row)
        if pending:
            done_q = _counts(acc, index, pending[-1], done_q)
            acc.stage_seconds["clip_cache"] += time.perf_counter() - t0
            yield [_measured(r, audio) for r in pending]
    for q in index.quarantine[done_q:]:
        replay_quarantine(acc, q)
    acc.refs_done, acc.recordings_cut, acc.segments = index.refs_done, index.recordings_cut, index.segments


class _LazyAudio:
    """The file's audio bytes by row, read (once, whole column) only when a clip needs its samples."""

    def __init__(self, pf: pq.ParquetFile) -> None:
        self._pf = pf
        self._column: pa.ChunkedArray | None = None

    def __getitem__(self, row: int) -> bytes:
        if self._column is None:
            self._column = self._pf.read(columns=["audio"]).column("audio")
        value: bytes = self._column[row]["bytes"].as_py()
        return value


def _counts(acc: ShardTally, index: ClipIndex, row: dict[str, Any], done_q: int) -> int:
    for q in index.quarantine[done_q:row["quarantined"]]:
        replay_quarantine(acc, q)
    acc.refs_done, acc.recordings_cut, acc.segments = row["refs_done"], row["recordings_cut"], row["segments"]
    return max(done_q, row["quarantined"])


def _measured(row: dict[str, Any], stored: _LazyAudio) -> Measured:
    clip = Clip.model_validate_json(row["clip"])
    m = json.loads(row["measured"])
    # Describing needs the samples only for a clip with several spans (per-span measures).
    samples = _decode(stored[row["row"]]) if len(clip.spans) > 1 and m["speech"] else np.zeros(0, np.float32)
    audio = DecodedAudio(samples=samples, sampling_rate=m["sampling_rate"],
                         source_sampling_rate=m["source_sampling_rate"], source_channels=m["source_channels"],
                         duration_s=m["duration_s"], sha256=row["audio_sha256"], clipping_ratio=m["clipping_ratio"])
    return Measured(clip=clip, audio=audio, features=Features.model_validate(m["features"]),
                    transcript=m["transcript"], transcript_source=m["transcript_source"], language=m["language"],
                    segments=[Segment.model_validate(s) for s in m["segments"]],
                    predictions={k: (v[0], float(v[1])) for k, v in m["predictions"].items()}, speech=m["speech"])


def _decode(data: bytes) -> np.ndarray:
    samples, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return np.asarray(samples, dtype=np.float32)
