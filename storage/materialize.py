"""Self-contained Parquet copies of a version's shards, for readers that cannot join audio files.

Audio stored once (storage/audio_files.py): a shard whose ShardInfo names an audio file has null
`audio.bytes`; our reader joins them back, but `datasets.load_dataset("parquet", …)`, DuckDB, or a
pulled copy read files as they are. Here each such shard is written once more locally, joined:
exactly the version's row schema (with its `huggingface` features) and the settings of
storage/shards.py (zstd, row groups of 100, list children named `item`), so every reader sees the
rows as a version with the audio in its shards would give them.

Inputs are downloaded whole and checked against the manifest's size and sha256 before use (each
audio file once per run, into a temporary folder beside the output, removed at the end): a corrupt
stored copy stops with an error naming it, never a quietly wrong file. Outputs go through
`<file>…part` + rename. A joined file's record, `.materialized/<file>.json` beside it, names the
inputs it came from and its own size and sha256, so a rerun reuses a file that still matches and
rewrites nothing. A shard without an audio file is copied verified (its sha256 is its own record).

    speechpairs datasets materialize ROOT/DATASET@vN --to DIR     # DIR/<shard sha256>.parquet
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.arrow import schema_from_b64
from schemas.manifest import Manifest, ShardInfo
from storage.audio_files import AudioLookup, AudioLookupError, fill_audio
from storage.card import stored_bytes
from storage.objectstore import NotFound, ObjectStore
from storage.shards import ROW_GROUP_ROWS, sha256_file
from storage.versions import file_key

log = logging.getLogger(__name__)

HOME_ENV = "SPEECHPAIRS_HOME"  # the data folder flows/local_server.py uses too
RECORD_DIR = ".materialized"


class MaterializeError(RuntimeError):
    """A stored input is missing or does not match its manifest entry, or cannot be joined (named)."""


ErrorType = Callable[[str], Exception]


def default_dir(dataset: str, version: str) -> Path:
    """`$SPEECHPAIRS_HOME/materialized/<dataset>/<version>`, else the user's cache folder (~/.cache)."""
    home = os.environ.get(HOME_ENV)
    if home:
        base = Path(home).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "speechpairs"
    return base / "materialized" / dataset / version


def local_ok(path: Path, size: int, sha256: str) -> bool:
    """A local file already holds these bytes (size first: a mismatch costs no hashing)."""
    try:
        if path.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    return sha256_file(path) == sha256


def fetch_verified(store: ObjectStore, key: str, target: Path, info: ShardInfo, *, what: str = "shard",
                   bar: Any = None, error: ErrorType = MaterializeError) -> None:
    """Download `key` to `target` through `<target>.part`, hashed on the way; renamed into place only
    when size and sha256 equal `info` (else `error`, naming `info.path` and the stored copy)."""
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(part, "wb") as fh:
            for chunk in store.iter_bytes(key):
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    except NotFound:
        part.unlink(missing_ok=True)
        raise error(f"{what} {info.path} is listed in the manifest but missing from the store "
                    f"({store.uri(key)})") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if size != info.bytes or digest.hexdigest() != info.sha256:
        part.unlink(missing_ok=True)
        raise error(f"{what} {info.path} does not match the manifest (bytes {size:,} vs {info.bytes:,}, "
                    f"sha256 {digest.hexdigest()[:16]}… vs {info.sha256[:16]}…): the stored copy at "
                    f"{store.uri(key)} is corrupt")
    os.replace(part, target)


@dataclass(frozen=True)
class Materialized:
    """One output file: where it is, what it holds (rows, bytes, sha256), and whether this run wrote it."""

    path: Path
    info: ShardInfo  # path: the shard's path in the version manifest
    written: bool


def _record_path(target: Path) -> Path:
    return target.parent / RECORD_DIR / f"{target.name}.json"


def _sources(shard: ShardInfo) -> dict[str, str | None]:
    return {"shard": shard.sha256, "audio": shard.audio.sha256 if shard.audio is not None else None}


def _reusable(target: Path, shard: ShardInfo) -> ShardInfo | None:
    """The joined file already at `target` if its record names these inputs and it still matches."""
    try:
        record = json.loads(_record_path(target).read_text(encoding="utf-8"))
        if record.get("sources") != _sources(shard):
            return None
        out = ShardInfo(path=shard.path, rows=int(record["rows"]), bytes=int(record["bytes"]),
                        sha256=str(record["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out if local_ok(target, out.bytes, out.sha256) else None


def _write_record(target: Path, shard: ShardInfo, out: ShardInfo) -> None:
    path = _record_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".part", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"sources": _sources(shard), "rows": out.rows, "bytes": out.bytes, "sha256": out.sha256}, fh)
    os.replace(tmp, path)


def write_joined(shard_file: Path, audio_file: Path, schema: pa.Schema, target: Path, *, name: str,
                 error: ErrorType = MaterializeError) -> tuple[int, int, str]:
    """Write `shard_file` with its audio bytes from `audio_file` to `target` (via a `.part` file):
    (rows, bytes, sha256). `name` is the shard as the error names it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    part = Path(tmp)
    rows = 0
    try:
        with (pq.ParquetFile(shard_file) as pf,
              AudioLookup(pafs.LocalFileSystem(), str(audio_file), str(audio_file)) as lookup,
              pq.ParquetWriter(part, schema, compression="zstd", store_schema=True,
                               use_compliant_nested_type=False) as writer):
            pending: pa.Table | None = None
            for batch in pf.iter_batches(batch_size=ROW_GROUP_ROWS):
                joined = pa.Table.from_batches([fill_audio(batch, lookup)]).cast(schema)
                pending = joined if pending is None else pa.concat_tables([pending, joined])
                full = pending.num_rows - pending.num_rows % ROW_GROUP_ROWS
                if full:  # whole row groups of 100, as storage/shards.py writes them
                    writer.write_table(pending.slice(0, full), row_group_size=ROW_GROUP_ROWS)
                    rows += full
                    pending = pending.slice(full)
            if pending is not None and pending.num_rows:
                writer.write_table(pending, row_group_size=ROW_GROUP_ROWS)
                rows += pending.num_rows
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        size, digest = part.stat().st_size, sha256_file(part)
        os.replace(part, target)
    except AudioLookupError as exc:
        raise error(f"shard {name}: {exc}") from None
    finally:
        part.unlink(missing_ok=True)
    return rows, size, digest


@dataclass
class Materializer:
    """Reuses or writes the joined file of one shard at a time, downloading verified inputs into
    `work` (each audio file once; removed on close)."""

    store: ObjectStore
    manifest: Manifest
    work: Path  # a folder on the output's disk, for the downloaded inputs
    bar: Any = None
    error: ErrorType = MaterializeError
    bytes_downloaded: int = 0
    _audio: dict[str, Path] = field(default_factory=dict)
    _counted: set[str] = field(default_factory=set)  # audio files already on the progress bar
    _tmp: Path | None = None

    def _inputs(self) -> Path:
        if self._tmp is None:
            self.work.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=".speechpairs-inputs-", dir=self.work))
        return self._tmp

    def _fetch(self, info: ShardInfo, what: str, *, bar: Any = None) -> Path:
        target = self._inputs() / f"{info.sha256}.parquet"
        fetch_verified(self.store, file_key(self.manifest, info), target, info, what=what, bar=bar, error=self.error)
        self.bytes_downloaded += info.bytes
        return target

    def reusable(self, shard: ShardInfo, target: Path) -> ShardInfo | None:
        """What is already at `target` for `shard`, when it still matches (None: write it)."""
        if shard.audio is None:
            return shard if local_ok(target, shard.bytes, shard.sha256) else None
        return _reusable(target, shard)

    def write(self, shard: ShardInfo, target: Path) -> ShardInfo:
        """Write `shard` self-contained at `target` (verified copy, or joined with its audio file)."""
        if shard.audio is None:
            fetch_verified(self.store, file_key(self.manifest, shard), target, shard, bar=self.bar, error=self.error)
            self.bytes_downloaded += shard.bytes
            return shard
        audio_key = file_key(self.manifest, shard.audio)
        if audio_key not in self._audio:
            bar = None if audio_key in self._counted else self.bar
            self._audio[audio_key] = self._fetch(shard.audio, f"audio file of shard {shard.path}:", bar=bar)
            self._counted.add(audio_key)
        rows_file = self._fetch(shard, "shard", bar=self.bar)
        try:
            rows, size, digest = write_joined(rows_file, self._audio[audio_key],
                                              schema_from_b64(self.manifest.arrow_schema), target,
                                              name=shard.path, error=self.error)
        finally:
            rows_file.unlink(missing_ok=True)
        if rows != shard.rows:
            target.unlink(missing_ok=True)
            raise self.error(f"shard {shard.path} has {rows} rows, the manifest says {shard.rows}")
        out = ShardInfo(path=shard.path, rows=rows, bytes=size, sha256=digest)
        _write_record(target, shard, out)
        return out

    def get(self, shard: ShardInfo, target: Path) -> Materialized:
        """`shard` at `target`: reused when it is already there and matches, else written."""
        found = self.reusable(shard, target)
        if found is not None:
            if self.bar is not None:
                self.bar.update(shard.bytes + self._audio_once(shard))
            return Materialized(target, found, written=False)
        return Materialized(target, self.write(shard, target), written=True)

    def _audio_once(self, shard: ShardInfo) -> int:
        """The bytes of `shard`'s audio file the first time it comes up (0 after, or without one)."""
        if shard.audio is None:
            return 0
        key = file_key(self.manifest, shard.audio)
        if key in self._counted:
            return 0
        self._counted.add(key)
        return shard.audio.bytes

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp, self._audio = None, {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def needs_materializing(manifest: Manifest) -> bool:
    """True when some shard keeps its audio in an audio file (readers of plain files miss the bytes)."""
    return any(s.audio is not None for s in manifest.shards)


def materialize_version(store: ObjectStore, manifest: Manifest, dest: Path, *, progress: bool = False,
                        ) -> list[Materialized]:
    """Every shard of `manifest` self-contained under `dest` as `<shard sha256>.parquet`, in manifest
    order (a rerun reuses what still matches and rewrites nothing)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        total = stored_bytes(manifest)  # the shards and each audio file once
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                   desc=f"{manifest.lineage.dataset}@{manifest.lineage.version}")
    out: list[Materialized] = []
    try:
        with Materializer(store, manifest, dest, bar=bar) as m:
            for shard in manifest.shards:
                out.append(m.get(shard, dest / f"{shard.sha256}.parquet"))
    finally:
        if bar is not None:
            bar.close()
    log.info("materialized %s %s in %s: %d written, %d reused", manifest.lineage.dataset,
             manifest.lineage.version, dest, sum(m.written for m in out), sum(not m.written for m in out))
    return out
