"""Check a committed version against its manifest: every byte, every row count, every schema.

`verify_version` re-reads what the manifest promises and reports each difference by shard:
- each data shard and quarantine part exists and has the manifest's byte size;
- its sha256 (streamed in chunks, never the whole object in memory) equals the manifest's (deep);
- its Parquet footer reads, its row count equals the manifest's, and its Arrow schema equals the
  manifest's `arrow_schema` (quarantine parts: QUARANTINE_SCHEMA), huggingface metadata included;
- the manifest's stats agree with its own shard list (rows, quarantined);
- the recorded run config (`config.yaml`, when the manifest lists one) exists, has its size and
  sha256 and parses as YAML; a version committed before configs were recorded has none to check;
- each distinct audio file the shards name (`ShardInfo.audio`, audio stored once) exists, has its
  size and sha256 (deep), reads as Parquet with `id` and `audio` columns, and holds every id of
  each row shard that names it (deep: the readers join the audio bytes on `id`). A version from
  before audio files names none and is checked as before.
It never raises for a damaged version: problems are collected so a CLI can name them all.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, Field

from schemas.arrow import QUARANTINE_SCHEMA, schema_from_b64
from schemas.manifest import FileInfo, Manifest, ShardInfo
from storage.audio_files import AUDIO, ID
from storage.layout import audio_clip_key, clip_index_key
from storage.objectstore import NotFound, ObjectStore
from storage.versions import MANIFEST_PATH, file_key, read_manifest, version_key

log = logging.getLogger(__name__)

_HF_KEY = b"huggingface"
_MAX_WORKERS = 8


class ShardProblem(BaseModel):
    """One thing wrong with one object of a version (`path` as the manifest lists it)."""

    path: str
    problem: str


class VerifyReport(BaseModel):
    dataset: str
    version: str
    shards_checked: int  # data shards + quarantine parts
    rows: int  # data rows counted in the shards' Parquet footers (the manifest's where unreadable)
    config_checked: bool = False  # the manifest lists a config.yaml (older versions do not)
    audio_files_checked: int = 0  # distinct audio files the shards name (0 before audio stored once)
    problems: list[ShardProblem] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.dataset} {self.version}: {self.shards_checked} shards"
                + (f", {self.audio_files_checked} audio files" if self.audio_files_checked else "")
                + (", config" if self.config_checked else "") + f", {self.rows:,} rows — "
                + ("OK" if self.ok else f"{len(self.problems)} problem(s)"))
        return "\n".join([head, *(f"  {p.path}: {p.problem}" for p in self.problems)])


def schema_difference(actual: pa.Schema, expected: pa.Schema) -> str | None:
    """None if the schemas are equal (fields, types, nullability and huggingface metadata)."""
    if not actual.equals(expected, check_metadata=False):
        if actual.names != expected.names:
            return f"schema differs from manifest (columns {actual.names} vs {expected.names})"
        diffs = [f"{a.name}: {a.type}{'' if a.nullable else ' not null'} vs "
                 f"{e.type}{'' if e.nullable else ' not null'}"
                 for a, e in zip(actual, expected, strict=True) if not a.equals(e)]
        return "schema differs from manifest (" + "; ".join(diffs[:3]) + (" …" if len(diffs) > 3 else "") + ")"
    if (actual.metadata or {}).get(_HF_KEY) != (expected.metadata or {}).get(_HF_KEY):
        return "schema differs from manifest (huggingface features metadata)"
    return None


def _check_bytes(store: ObjectStore, key: str, info: ShardInfo, deep: bool, bad: Callable[[str], None]) -> bool:
    """Existence, size and (deep) sha256 of one listed object; False if it is missing."""
    try:
        size = store.size(key)
    except NotFound:
        bad("missing")
        return False
    if size != info.bytes:
        bad(f"size {size:,} bytes != manifest {info.bytes:,}")
    elif deep:  # a size mismatch already proves the bytes differ; don't stream them again
        try:
            digest = store.sha256(key)
        except NotFound:
            bad("missing")
            return False
        if digest != info.sha256:
            bad(f"sha256 mismatch (expected {info.sha256}, got {digest})")
    return True


def _check_object(store: ObjectStore, fs_base: tuple[pafs.FileSystem, str], key: str, info: ShardInfo,
                  expected_schema: pa.Schema | None, deep: bool) -> tuple[list[ShardProblem], int | None]:
    """Problems of one listed object (at store `key`) and the row count its footer reports (None if
    unreadable)."""
    problems: list[ShardProblem] = []

    def bad(text: str) -> None:
        problems.append(ShardProblem(path=info.path, problem=text))

    if not _check_bytes(store, key, info, deep, bad):
        return problems, None
    fs, base = fs_base
    rows: int | None = None
    try:
        with fs.open_input_file(f"{base}/{key}") as fh:
            pf = pq.ParquetFile(fh)
            rows = pf.metadata.num_rows
            schema = pf.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        bad(f"unreadable Parquet ({type(exc).__name__}: {str(exc)[:200]})")
        return problems, None
    if rows != info.rows:
        bad(f"rows {rows:,} != manifest {info.rows:,}")
    diff = schema_difference(schema, expected_schema) if expected_schema is not None else None
    if diff:
        bad(diff)
    return problems, rows


def _audio_fix(key: str) -> str:
    """What to do about a damaged audio file: its rows cannot get their audio until it is made again."""
    dataset = key.split("/", 1)[0]
    clip_key = audio_clip_key(dataset, key)
    index = clip_index_key(dataset, clip_key) if clip_key else "(beside it, <clip-key>.json)"
    return (f"fix: restore it, or delete it and its clip index {index} and re-run the version's config.yaml "
            "(`speechpairs run --config …`), which measures those clips again")


def _check_audio(store: ObjectStore, fs_base: tuple[pafs.FileSystem, str], key: str, info: ShardInfo,
                 users: list[str], deep: bool) -> tuple[list[ShardProblem], set[str] | None]:
    """Problems of one audio file (at store `key`) that the row shards `users` name, and its ids
    (deep only; None if not read): readers join each shard's audio bytes from it on `id`."""
    problems: list[ShardProblem] = []
    of = f"audio of {users[0]}" + (f" and {len(users) - 1} more shard(s)" if len(users) > 1 else "")

    def bad(text: str) -> None:
        problems.append(ShardProblem(path=info.path, problem=f"{text} ({of}); {_audio_fix(key)}"))

    if not _check_bytes(store, key, info, deep, bad):
        return problems, None
    fs, base = fs_base
    ids: set[str] | None = None
    try:
        with fs.open_input_file(f"{base}/{key}") as fh:
            pf = pq.ParquetFile(fh)
            rows = pf.metadata.num_rows
            lacking = [c for c in (ID, AUDIO) if c not in pf.schema_arrow.names]
            if deep and not lacking:
                ids = {str(i) for i in pf.read(columns=[ID]).column(ID).to_pylist()}
    except (OSError, pa.ArrowException) as exc:
        bad(f"unreadable Parquet ({type(exc).__name__}: {str(exc)[:200]})")
        return problems, None
    if rows != info.rows:
        bad(f"rows {rows:,} != manifest {info.rows:,}")
    if lacking:
        bad(f"no {' or '.join(repr(c) for c in lacking)} column (an audio file has `id` and `audio`)")
    return problems, ids


def _shard_ids(fs_base: tuple[pafs.FileSystem, str], key: str) -> list[str] | None:
    """A row shard's ids, or None if it cannot be read (its own check reports why)."""
    fs, base = fs_base
    try:
        with fs.open_input_file(f"{base}/{key}") as fh:
            return [str(i) for i in pq.ParquetFile(fh).read(columns=[ID]).column(ID).to_pylist()]
    except (OSError, pa.ArrowException, KeyError):
        return None


def _check_audio_files(store: ObjectStore, manifest: Manifest, fs_base: tuple[pafs.FileSystem, str],
                       pool: ThreadPoolExecutor, deep: bool) -> tuple[list[ShardProblem], int]:
    """Every distinct audio file the shards name (once, however many shards share it), and (deep)
    every shard's ids in its audio file. Returns the problems and the number of audio files."""
    files: dict[str, tuple[ShardInfo, list[ShardInfo]]] = {}
    for shard in manifest.shards:
        if shard.audio is not None:
            files.setdefault(file_key(manifest, shard.audio), (shard.audio, []))[1].append(shard)
    if not files:
        return [], 0
    keys = list(files)

    def check(key: str) -> tuple[list[ShardProblem], set[str] | None]:
        info, users = files[key]
        return _check_audio(store, fs_base, key, info, [u.path for u in users], deep)

    results = dict(zip(keys, pool.map(check, keys), strict=True))
    problems = [p for key in keys for p in results[key][0]]
    pairs = [(key, shard) for key in keys if results[key][1] is not None for shard in files[key][1]]
    shard_ids = list(pool.map(lambda pair: _shard_ids(fs_base, file_key(manifest, pair[1])), pairs))
    for (key, shard), ids in zip(pairs, shard_ids, strict=True):
        held = results[key][1]
        assert held is not None
        absent = [i for i in ids or [] if i not in held]
        if absent:  # named by the shard: a shard rewritten or swapped since is the usual cause
            problems.append(ShardProblem(
                path=shard.path,
                problem=f"{len(absent):,} of its {len(ids or []):,} ids are not in its audio file {files[key][0].path} "
                        f"(first {absent[0]!r}): readers cannot join their audio; fix: re-run the version's "
                        "config.yaml (`speechpairs run --config …`)"))
    return problems, len(files)


def _check_config(store: ObjectStore, key: str, info: FileInfo, deep: bool) -> list[ShardProblem]:
    """Problems of the recorded config file (at store `key`): missing, resized, changed bytes, not YAML."""
    try:
        size = store.size(key)
        if size != info.bytes:
            return [ShardProblem(path=info.path, problem=f"size {size:,} bytes != manifest {info.bytes:,}")]
        if not deep:
            return []
        data = store.get_bytes(key)  # a few KB: read once for both the checksum and the parse
    except NotFound:
        return [ShardProblem(path=info.path, problem="missing")]
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        return [ShardProblem(path=info.path, problem=f"sha256 mismatch (expected {info.sha256}, got {digest})")]
    try:
        loaded = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        return [ShardProblem(path=info.path, problem=f"not valid YAML ({str(exc)[:200]})")]
    if not isinstance(loaded, dict):
        return [ShardProblem(path=info.path, problem="not a mapping of settings")]
    return []


def verify_manifest(store: ObjectStore, manifest: Manifest, *, deep: bool = True,
                    workers: int | None = None) -> VerifyReport:
    """Verify the objects of an already-read manifest (see module doc).

    `deep=False` skips the sha256 (which reads every byte) and the audio files' id check (which reads
    the `id` columns) and checks existence, size, footer row counts and schemas only (one HEAD and
    one footer read per object).
    """
    dataset, version = manifest.lineage.dataset, manifest.lineage.version
    problems: list[ShardProblem] = []
    try:
        row_schema = schema_from_b64(manifest.arrow_schema)
    except (ValueError, pa.ArrowException) as exc:
        problems.append(ShardProblem(path=MANIFEST_PATH, problem=f"unreadable arrow_schema ({exc})"))
        row_schema = None

    fs_base = store.arrow_fs()
    jobs: list[tuple[ShardInfo, pa.Schema | None]] = [(s, row_schema) for s in manifest.shards]
    jobs += [(q, QUARANTINE_SCHEMA) for q in manifest.quarantine]

    def check(job: tuple[ShardInfo, pa.Schema | None]) -> tuple[list[ShardProblem], int | None]:
        return _check_object(store, fs_base, file_key(manifest, job[0]), job[0], job[1], deep)

    n_workers = max(1, min(workers or min(_MAX_WORKERS, (os.cpu_count() or 2) * 2), len(jobs) or 1))
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="verify") as pool:
        results = list(pool.map(check, jobs))  # manifest order, whatever order they finish in
        audio_problems, audio_files = _check_audio_files(store, manifest, fs_base, pool, deep)

    rows = 0
    quarantined = 0
    for i, (found, counted) in enumerate(results):
        problems += found
        info = jobs[i][0]
        if i < len(manifest.shards):
            rows += counted if counted is not None else info.rows
        else:
            quarantined += counted if counted is not None else info.rows

    problems += audio_problems
    if manifest.config is not None:
        problems += _check_config(store, version_key(dataset, version, manifest.config.path), manifest.config, deep)

    listed_rows = sum(s.rows for s in manifest.shards)
    if manifest.stats.rows != listed_rows:
        problems.append(ShardProblem(path=MANIFEST_PATH, problem=f"stats.rows {manifest.stats.rows:,} != "
                                                                 f"sum of shard rows {listed_rows:,}"))
    listed_q = sum(q.rows for q in manifest.quarantine)
    if manifest.stats.quarantined != listed_q:
        problems.append(ShardProblem(path=MANIFEST_PATH, problem=f"stats.quarantined {manifest.stats.quarantined:,}"
                                                                 f" != sum of quarantine part rows {listed_q:,}"))
    report = VerifyReport(dataset=dataset, version=version, shards_checked=len(jobs), rows=rows,
                          config_checked=manifest.config is not None, audio_files_checked=audio_files,
                          problems=problems)
    log.info("verified %s %s: %d objects, %d audio files, %d rows, %d problems", dataset, version, len(jobs),
             audio_files, rows, len(problems))
    return report


def verify_version(store: ObjectStore, dataset: str, version: str, *, deep: bool = True) -> VerifyReport:
    """Verify committed `dataset`/`version` (a vNNNN name) in `store` against its manifest.

    Raises VersionNotFound only if the version has no manifest; every other defect is a problem
    in the report. `deep=False` skips the streamed sha256 of each object.
    """
    return verify_manifest(store, read_manifest(store, dataset, version), deep=deep)
