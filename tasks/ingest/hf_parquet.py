"""Hugging Face Parquet (`prepare_hf_parquet`): Parquet files with an `Audio` column, local or on S3.

A source is one `.parquet` file or a folder (or `s3://bucket/prefix`) of them, read recursively in
sorted order (the Hub's `data/train-00000-of-00004.parquet` layout). The audio column is the one the
`huggingface` schema metadata declares as `Audio`, else a column `audio` / the first struct with a
`bytes` field (HF storage: struct<bytes: binary, path: string>); the bytes become
`Clip.audio_bytes` (a row with only a `path` points at that file instead).

Ids: the `id` column when there is one, else `<file without .parquet>/<row>` (zero-padded, so the
planner's sorted order is file order and a shard reads each row group once). Locator `<file>#<row>`:
a shard re-reads its rows one row group at a time (a few row groups cached), never the whole file.
Transcript: the first of `text`, `sentence`, `transcript`, `transcription` present; `language`
fills the clip's language; every other scalar column becomes a label, verbatim.

S3: the filesystem comes from storage/sources.py with the source's own settings: the run's `s3` block
merged with `sources[N].s3` (ingest registers them per source), then the usual AWS_* variables
(`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for S3-compatible stores such as SeaweedFS or MinIO).
"""

from __future__ import annotations

import bisect
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.records import Clip, ReasonCode
from storage import sources
from tasks.ingest.common import ClipRef, SourceError, clean_label_value, make_id, one_line
from tasks.ingest.paths import Rejected, Roots, WalkProblem, prepare, walk

TRANSCRIPT_COLUMNS = ("text", "sentence", "transcript", "transcription")
ID_COLUMN = "id"
LANGUAGE_COLUMN = "language"
ROW_GROUPS_CACHED = 4


def is_remote(uri: str) -> bool:
    return "://" in uri


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    if uri.startswith("s3://"):
        return sources.arrow_filesystem(uri), uri.removeprefix("s3://").rstrip("/")
    if is_remote(uri):
        raise SourceError(f"source {uri}: only local paths and s3:// URIs are supported for kind hf_parquet")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _uri(root: str, fs_path: str) -> str:
    return f"s3://{fs_path}" if root.startswith("s3://") else fs_path


@dataclass(frozen=True)
class ParquetFileRef:
    rel: str  # relative to the source folder (the file's name for a single-file source)
    uri: str  # local path or s3:// URI
    size: int
    mtime_ns: int


def _base(root: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, path = filesystem(root)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise SourceError(f"source {root}: cannot be listed ({exc}); check the path and AWS_* settings") from None
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"source {root}: no such file or directory; fix sources[].path in the config")
    return fs, path, info


def parquet_files(root: str) -> list[ParquetFileRef]:
    """The source's Parquet files in sorted order (a SourceError when there are none)."""
    return parquet_listing(root)[0]


def parquet_listing(root: str, roots: Roots | None = None) -> tuple[list[ParquetFileRef], list[WalkProblem]]:
    """(Parquet files in sorted order, what a local walk could not enter or read). A local folder is
    walked like a folder source (`paths.walk`: links followed inside the roots only, loops caught;
    pyarrow's own recursive listing follows a link loop until the path is too long); a FIFO or device
    named .parquet is a problem (never opened)."""
    fs, path, info = _base(root)
    if info.type == pafs.FileType.File:
        return [ParquetFileRef(info.base_name, _uri(root, path), int(info.size or 0), int(info.mtime_ns or 0))], []
    problems: list[WalkProblem] = []
    files: list[ParquetFileRef] = []
    if is_remote(root):
        found = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if i.type == pafs.FileType.File and i.path.lower().endswith(".parquet")
                 and not any(part.startswith(".") for part in i.path[len(path) + 1:].split("/"))]
        files = [ParquetFileRef(rel, _uri(root, i.path), int(i.size or 0), int(i.mtime_ns or 0))
                 for rel, i in sorted((i.path[len(path) + 1:], i) for i in found)]
    else:
        for item in walk(Path(path), lambda name: name.lower().endswith(".parquet"), roots or Roots.of(path)):
            if isinstance(item, WalkProblem):
                problems.append(item)
            elif not any(part.startswith(".") for part in item.split("/")):
                ref = _regular_file(path, item)
                if isinstance(ref, WalkProblem):
                    problems.append(ref)
                else:
                    files.append(ref)
        files.sort(key=lambda f: f.rel)
    if not files and not problems:
        raise SourceError(f"source {root}: no .parquet files; point sources[].path at a Parquet file or a folder "
                          "of them (e.g. a Hugging Face dataset's data/ folder)")
    return files, problems


def _regular_file(base: str, rel: str) -> ParquetFileRef | WalkProblem:
    try:
        st = os.stat(f"{base}/{rel}")
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        return WalkProblem(rel, ReasonCode.not_a_file, f"{base}/{rel}: not a regular file (a FIFO, device or "
                           "dangling link); remove it or put the Parquet file in its place", folder=False)
    return ParquetFileRef(rel, f"{base}/{rel}", st.st_size, st.st_mtime_ns)


def _is_scalar(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)
                or pa.types.is_temporal(t) or (pa.types.is_dictionary(t) and _is_scalar(t.value_type)))


def _audio_column(schema: pa.Schema) -> str | None:
    hf = (schema.metadata or {}).get(b"huggingface")
    if hf:
        try:
            features = json.loads(hf).get("info", {}).get("features", {})
        except (ValueError, AttributeError):
            features = {}
        for name, feature in features.items() if isinstance(features, dict) else []:
            if isinstance(feature, dict) and feature.get("_type") == "Audio" and name in schema.names:
                return str(name)
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0]
    if "audio" in structs:
        return "audio"
    if structs:
        return structs[0]
    if "audio" in schema.names and pa.types.is_binary(schema.field("audio").type):
        return "audio"
    return None


@dataclass(frozen=True)
class FileMeta:
    row_group_starts: tuple[int, ...]
    num_rows: int
    audio: str
    transcript: str | None
    id: str | None
    language: str | None
    labels: tuple[str, ...]

    @property
    def columns(self) -> list[str]:
        cols = [self.audio, *self.labels]
        cols += [c for c in (self.transcript, self.id, self.language) if c]
        return cols


def _open(uri: str) -> pq.ParquetFile:
    fs, path = filesystem(uri)
    return pq.ParquetFile(fs.open_input_file(path))


@lru_cache(maxsize=64)
def file_meta(uri: str, size: int, mtime_ns: int) -> FileMeta:
    """Columns and row-group layout of one file (cached per path, size and mtime)."""
    pf = _open(uri)
    schema = pf.schema_arrow
    audio = _audio_column(schema)
    if audio is None:
        raise SourceError(f"{uri}: no audio column (an HF `Audio` feature or a struct<bytes, path> column; columns: "
                          f"{schema.names}); write the dataset with datasets' Audio() feature, or use kind: manifest")
    scalar = {f.name for f in schema if _is_scalar(f.type)}
    transcript = next((c for c in TRANSCRIPT_COLUMNS if c in scalar), None)
    ident = ID_COLUMN if ID_COLUMN in scalar else None
    language = LANGUAGE_COLUMN if LANGUAGE_COLUMN in scalar else None
    labels = tuple(f.name for f in schema if f.name in scalar and f.name not in {audio, transcript, ident, language})
    starts, total = [], 0
    for i in range(pf.metadata.num_row_groups):
        starts.append(total)
        total += pf.metadata.row_group(i).num_rows
    return FileMeta(tuple(starts), total, audio, transcript, ident, language, labels)


def _meta_of(ref: ParquetFileRef) -> FileMeta:
    return file_meta(ref.uri, ref.size, ref.mtime_ns)


def _stem(rel: str) -> str:
    return rel[: -len(".parquet")] if rel.lower().endswith(".parquet") else rel


def iter_hf_parquet_refs(root: Path | str, source_index: int, dataset: str, *,
                         roots: Roots | None = None) -> Iterator[ClipRef]:
    files, problems = parquet_listing(str(root), roots)
    for problem in problems:
        yield problem.ref(dataset, source_index)
    for ref in files:
        meta = _meta_of(ref)
        width = max(6, len(str(max(meta.num_rows - 1, 0))))
        if meta.id is None:
            for row in range(meta.num_rows):
                yield ClipRef(id=make_id(dataset, f"{_stem(ref.rel)}/{row:0{width}d}"), source=source_index,
                              locator=f"{ref.rel}#{row}")
            continue
        row = 0
        for batch in _open(ref.uri).iter_batches(columns=[meta.id], batch_size=4096):
            for value in batch.column(0).to_pylist():
                local = clean_label_value(value) if value is not None else ""
                yield ClipRef(id=make_id(dataset, local or f"{_stem(ref.rel)}/{row:0{width}d}"),
                              source=source_index, locator=f"{ref.rel}#{row}")
                row += 1


@lru_cache(maxsize=ROW_GROUPS_CACHED)
def _row_group(uri: str, size: int, mtime_ns: int, index: int) -> pa.Table:
    meta = file_meta(uri, size, mtime_ns)
    return _open(uri).read_row_group(index, columns=meta.columns)


@lru_cache(maxsize=256)
def _remote_info(uri: str) -> tuple[int, int]:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return int(info.size or 0), int(info.mtime_ns or 0)


def _local_file_ref(root: str, rel: str) -> ParquetFileRef:
    local = Path(root).expanduser().resolve()
    file = (local if local.is_dir() else local.parent) / rel
    try:
        st = file.stat()
    except FileNotFoundError:
        raise SourceError(f"{file}: Parquet file disappeared after planning; restore it or re-run") from None
    return ParquetFileRef(rel, str(file), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _remote_base(root: str) -> str:
    fs, path = filesystem(root)
    return path if fs.get_file_info(path).type == pafs.FileType.Directory else path.rsplit("/", 1)[0]


def load_hf_parquet_clip(root: Path | str, locator: str, *, clip_id: str, dataset: str, language: str | None,
                         extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    rel, _, row_text = locator.rpartition("#")
    root = str(root)
    if is_remote(root):
        uri = _uri(root, f"{_remote_base(root)}/{rel}")
        size, mtime = _remote_info(uri)
        ref = ParquetFileRef(rel, uri, size, mtime)
    else:
        ref = _local_file_ref(root, rel)
    row = int(row_text)
    where = f"{ref.uri}#row={row}"
    meta = _meta_of(ref)
    if not 0 <= row < meta.num_rows:
        msg = f"{where}: the file has {meta.num_rows} rows; it changed after planning, re-run"
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, msg))
    group = bisect.bisect_right(meta.row_group_starts, row) - 1
    table = _row_group(ref.uri, ref.size, ref.mtime_ns, group)
    record = table.slice(row - meta.row_group_starts[group], 1).to_pylist()[0]
    audio = record.get(meta.audio)
    data: bytes | None = None
    uri = where
    if isinstance(audio, (bytes, bytearray)):
        data = bytes(audio)
    elif isinstance(audio, dict) and audio.get("bytes"):
        data = bytes(audio["bytes"])
    elif isinstance(audio, dict) and isinstance(audio.get("path"), str) and audio["path"].strip():
        path = audio["path"].strip()
        if is_remote(path) or path.startswith("/"):
            uri = path
        else:
            uri = _uri(ref.uri, f"{ref.uri.removeprefix('s3://').rsplit('/', 1)[0]}/{path}")
        # A path in a row is read only below the source (its folder or s3:// prefix) or allowed_roots.
        checked = (roots or Roots.of(root)).check(uri, where)
        if isinstance(checked, Rejected):
            return checked.clip(clip_id, dataset, where)
        uri = checked
    else:
        msg = f"{where}: column {meta.audio!r} has neither bytes nor a path; fix or drop the row"
        return Clip(id=clip_id, dataset=dataset, audio_uri=where, ingest_error=(ReasonCode.bad_row, msg))
    labels = dict(extra_labels)
    for col in meta.labels:
        value = record.get(col)
        if value is not None and clean_label_value(value):
            labels[col] = clean_label_value(value)
    text = record.get(meta.transcript) if meta.transcript else None
    lang = record.get(meta.language) if meta.language else None
    return Clip(id=clip_id, dataset=dataset, audio_uri=uri, audio_bytes=data,
                transcript=one_line(str(text)) if text is not None else None,
                language=str(lang) if lang else language, labels=labels)


def prepare_hf_parquet(path: str | Path, dataset: str = "hf_parquet", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_hf_parquet_refs, load_hf_parquet_clip, str(path), dataset, allowed_roots)
