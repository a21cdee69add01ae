"""Consumer-side entry points: dataset URIs, manifests, a human summary, and the consumer API.

A dataset URI is `ROOT/DATASET[@REF]`, e.g. `./data/demo@v0001` or `s3://bucket/prefix/demo`;
REF is a version (v0003) or a ref/tag name and defaults to `latest`.

    ds = open_dataset("s3://bucket/prefix/demo", version="stable")
    ds.verify().ok                                  # checksums, row counts, schema
    for batch in ds.iter_batches(columns=["id", "response"]):   # streamed, shard by shard
        ...
    datasets.load_dataset("parquet", data_files=ds.hf_data_files())
    torch.utils.data.DataLoader(ds.torch_dataset(world_size=2, rank=0), batch_size=None, num_workers=2)

Readers go through the manifest only (never list prefixes): a handle sees exactly the shards of
its committed version, in manifest order.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from schemas.arrow import schema_from_b64
from schemas.config import S3Config
from schemas.manifest import Manifest, ShardInfo
from storage.audio_files import AUDIO, ID, AudioLookup, fill_audio
from storage.objectstore import ObjectStore, S3Store, open_store
from storage.s3 import DuckDBSecret, S3Settings
from storage.versions import (
    DATASET_RE,
    REF_RE,
    VERSION_RE,
    file_key,
    read_manifest,
    resolve_version,
    version_prefix,
)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from storage.torch_dataset import SpeechPairsIterableDataset
    from storage.verify import VerifyReport


def parse_dataset_uri(text: str) -> tuple[str, str, str]:
    """'ROOT/DATASET[@REF]' → (root, dataset, ref); the ref defaults to 'latest'."""
    raw = text.strip()
    body = raw.rstrip("/")
    root, sep, last = body.rpartition("/")
    if not sep or not root or root in ("s3:", "s3:/") or root.endswith("://"):
        raise ValueError(f"dataset URI {text!r} must look like ROOT/DATASET[@REF], e.g. ./data/demo@v0001 "
                         "or s3://bucket/prefix/demo")
    dataset, at, ref = last.partition("@")
    if not at:
        ref = "latest"
    if not DATASET_RE.match(dataset):
        raise ValueError(f"dataset URI {text!r}: invalid dataset name {dataset!r}")
    if not (VERSION_RE.match(ref) or REF_RE.match(ref)):
        raise ValueError(f"dataset URI {text!r}: invalid version or ref {ref!r}")
    return root, dataset, ref


def open_manifest(uri: str, s3: S3Config | S3Settings | None = None) -> Manifest:
    """Resolve a dataset URI to its committed manifest (raises VersionNotFound if none)."""
    root, dataset, ref = parse_dataset_uri(uri)
    store = open_store(root, s3)
    return read_manifest(store, dataset, resolve_version(store, dataset, ref))


def _shard_lines(title: str, shards: list[ShardInfo]) -> list[str]:
    lines = [f"{title} ({len(shards)}):"]
    lines += [f"  {s.path}  rows={s.rows:,}  bytes={s.bytes:,}  sha256={s.sha256[:16]}…" for s in shards]
    return lines


def manifest_summary(manifest: Manifest, config: Mapping[str, Any] | None = None) -> str:
    """A short human description of one version: what is in it and how it was made; with
    `config` (storage.versions.read_config), the run's recorded settings follow."""
    lin, st = manifest.lineage, manifest.stats
    reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(st.quarantine_by_reason.items(), key=lambda kv: -kv[1]))
    lines = [
        f"dataset {lin.dataset}  version {lin.version}  parent {lin.parent or '-'}",
        f"created {lin.created_at.isoformat()}  run {lin.run_id}" + (f"  flow run {lin.flow_run_id}"
                                                                      if lin.flow_run_id else ""),
        f"rows {st.rows:,}  clips in {st.clips_in:,}  quarantined {st.quarantined:,}"
        + (f" ({reasons})" if reasons else ""),
        f"audio {st.audio_hours:.3f} h",
        *_shard_lines("shards", manifest.shards),
    ]
    if manifest.quarantine:
        lines += _shard_lines("quarantine", manifest.quarantine)
    lines.append(f"lineage: code {lin.code_version}  config {lin.config_hash}  bins {lin.bins_version}  "
                 f"prompt pool {lin.prompt_pool_hash}")
    if lin.models:
        lines.append("models: " + ", ".join(f"{m.role}={m.name}" + (f"@{m.revision}" if m.revision else "")
                                            for m in lin.models))
    if lin.sampling:
        lines.append("sampling: " + ", ".join(f"{k}={v}" for k, v in sorted(lin.sampling.items())))
    if lin.extractor_versions:
        lines.append("extractors: " + ", ".join(f"{k}={v}" for k, v in sorted(lin.extractor_versions.items())))
    if manifest.config is None:
        lines.append("config: not recorded (this version was committed before run configs were stored; "
                     f"config hash {lin.config_hash})")
    else:
        lines.append(f"config: {manifest.config.path}  bytes={manifest.config.bytes:,}  "
                     f"sha256={manifest.config.sha256[:16]}…")
        if config is not None:
            text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True, width=1000)
            lines += [f"  {line}" for line in text.rstrip("\n").splitlines()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Consumer API
# --------------------------------------------------------------------------------------------

# Footer and column chunks of a row group are fetched in a few coalesced range requests
# (pre-buffering) instead of one request per column chunk: on S3 that is most of the cost.
_READ_OPTIONS: dict[str, Any] = {"pre_buffer": True}
_HF_KEY = b"huggingface"


def open_dataset(uri: str, version: str | None = None, *,
                 s3: S3Config | S3Settings | None = None) -> DatasetHandle:
    """Open one committed version: `uri` is ROOT/DATASET[@REF]; `version` ("latest", "v0003" or a
    tag) overrides the @REF; the default is latest. Raises VersionNotFound if it does not resolve.

    S3 endpoint, region and addressing are resolved once (storage/s3.py: `s3`, then AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL / AWS_REGION, then defaults) and every read below uses them; credentials come
    from `s3.credentials_block` or boto3's chain, never from arguments.
    """
    root, dataset, ref = parse_dataset_uri(uri)
    if version is not None:
        if not (VERSION_RE.match(version) or REF_RE.match(version)):
            raise ValueError(f"invalid version or ref {version!r}")
        ref = version
    store = open_store(root, s3)
    resolved = resolve_version(store, dataset, ref)
    return DatasetHandle(store, dataset, resolved, read_manifest(store, dataset, resolved), s3=s3)


class DatasetHandle:
    """One committed, immutable version: its manifest and ways to read its rows.

    Picklable (the store is reopened from root + the resolved S3 settings, so a worker reaches the
    same store whatever its environment), for DataLoader workers started with spawn/forkserver too.
    """

    def __init__(self, store: ObjectStore, dataset: str, version: str, manifest: Manifest, *,
                 s3: S3Config | S3Settings | None = None) -> None:
        self.store = store
        self.dataset = dataset
        self.version = version
        self.manifest = manifest
        self._s3 = store.settings if isinstance(store, S3Store) else s3
        self._fs: tuple[pafs.FileSystem, str] | None = None
        self._schema: pa.Schema | None = None

    # -- identity ------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"{self.store.root.rstrip('/')}/{self.dataset}@{self.version}"

    @property
    def prefix(self) -> str:
        return version_prefix(self.dataset, self.version)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.manifest.shards)

    @property
    def shards(self) -> list[ShardInfo]:
        return list(self.manifest.shards)

    @property
    def schema(self) -> pa.Schema:
        """The version's Arrow schema as committed in the manifest (with huggingface metadata)."""
        if self._schema is None:
            self._schema = schema_from_b64(self.manifest.arrow_schema)
        return self._schema

    def __repr__(self) -> str:
        return f"DatasetHandle({self.uri!r}, shards={len(self.manifest.shards)}, rows={self.num_rows})"

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.store.root, "s3": self._s3, "dataset": self.dataset, "version": self.version,
                "manifest": self.manifest.model_dump(mode="json")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(open_store(state["root"], state["s3"]), state["dataset"], state["version"],  # type: ignore[misc]
                      Manifest.model_validate(state["manifest"]), s3=state["s3"])

    # -- checks --------------------------------------------------------------------------
    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Checksums, byte sizes, row counts and schemas of every listed object (see storage.verify)."""
        from storage.verify import verify_manifest

        return verify_manifest(self.store, self.manifest, deep=deep)

    # -- where the files are -------------------------------------------------------------
    def shard_key(self, i: int) -> str:
        """The store key of shard `i` (inside the version, or the data key it references)."""
        return file_key(self.manifest, self.manifest.shards[i])

    def shard_uris(self) -> list[str]:
        """Absolute paths (local root) or s3:// URIs of the data shards, in manifest order."""
        return [self.store.uri(self.shard_key(i)) for i in range(len(self.manifest.shards))]

    def hf_data_files(self, materialize_to: str | Path | None = None) -> list[str]:
        """`data_files` for `datasets.load_dataset("parquet", data_files=..., split="train")`.

        Local roots give absolute paths. S3 roots give s3:// URIs, which `datasets` opens through
        fsspec: that needs `s3fs` installed and, for a non-AWS endpoint,
        `storage_options=handle.hf_storage_options()` (the same endpoint the reader uses).

        Audio stored once: when shards keep their audio in audio files, `datasets` would read null
        bytes, so the shards are materialised, joined, into `materialize_to` (default
        storage.materialize.default_dir: `$SPEECHPAIRS_HOME/materialized/<dataset>/<version>`, else
        ~/.cache/speechpairs/…) and their local paths returned; a rerun reuses them.
        """
        from storage.materialize import default_dir, materialize_version, needs_materializing

        if not needs_materializing(self.manifest):
            return self.shard_uris()
        dest = Path(materialize_to) if materialize_to is not None else default_dir(self.dataset, self.version)
        return [str(m.path.resolve()) for m in materialize_version(self.store, self.manifest, dest)]

    def hf_storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs `storage_options` with the store's resolved endpoint, region and addressing;
        {} for a local root. Keys are included only for a Prefect credentials block (s3fs reads
        boto3's chain itself): then the dict holds secrets, so do not log it."""
        if not isinstance(self.store, S3Store):
            return {}
        return self.store.access.fsspec_options()

    def duckdb_secret(self, name: str = "speechpairs") -> DuckDBSecret | None:
        """DuckDB `CREATE SECRET` for this S3 root from the resolved settings (None for a local
        root). `secret.apply(con)` runs it; `str(secret)` hides the keys, `secret.sql()` does not."""
        if not isinstance(self.store, S3Store):
            return None
        return self.store.access.duckdb_secret(name, scope=self.store.root)

    # -- reading -------------------------------------------------------------------------
    def _arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            self._fs = self.store.arrow_fs()
        return self._fs

    def detached(self) -> DatasetHandle:
        """A copy that opens its own filesystem connection (for forked workers and threads)."""
        return DatasetHandle(self.store, self.dataset, self.version, self.manifest, s3=self._s3)

    def check_columns(self, columns: list[str] | None) -> list[str] | None:
        """`columns` as a list, or ValueError naming the unknown ones (None = all columns)."""
        if columns is None:
            return None
        names = self.schema.names
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown} in {self.uri}; columns are {names}")
        return list(columns)

    def _projected_metadata(self, columns: list[str] | None) -> dict[bytes, bytes] | None:
        """Schema metadata for a column subset: huggingface features of those columns only."""
        meta = dict(self.schema.metadata or {})
        if columns is None or _HF_KEY not in meta:
            return None
        info = json.loads(meta[_HF_KEY])
        feats = info.get("info", {}).get("features")
        if isinstance(feats, dict):
            info["info"]["features"] = {k: v for k, v in feats.items() if k in columns}
            meta[_HF_KEY] = json.dumps(info).encode()
        return meta

    @contextlib.contextmanager
    def open_shard(self, i: int) -> Iterator[pq.ParquetFile]:
        """Random-access Parquet reader over shard `i` (range reads; nothing downloaded up front)."""
        fs, base = self._arrow_fs()
        with fs.open_input_file(f"{base}/{self.shard_key(i)}") as fh, pq.ParquetFile(fh, **_READ_OPTIONS) as pf:
            yield pf

    def audio_lookup(self, i: int) -> AudioLookup | None:
        """The join for shard `i`'s audio bytes when they live in an audio file (audio stored once)."""
        info = self.manifest.shards[i].audio
        if info is None:
            return None
        fs, base = self._arrow_fs()
        key = file_key(self.manifest, info)
        return AudioLookup(fs, f"{base}/{key}", self.store.uri(key))

    def _joined(self, i: int, columns: list[str] | None) -> tuple[AudioLookup | None, list[str] | None, bool]:
        """(the audio join shard `i` needs for `columns`, the columns to read, whether `id` is extra)."""
        lookup = self.audio_lookup(i) if columns is None or AUDIO in columns else None
        if lookup is None or columns is None or ID in columns:
            return lookup, columns, False
        return lookup, [*columns, ID], True

    def iter_shard(self, i: int, columns: list[str] | None = None, batch_size: int = 256, *,
                   start: int = 0, stop: int | None = None) -> Iterator[pa.RecordBatch]:
        """Batches of rows [start, stop) of shard `i`; only the row groups that overlap are read."""
        columns = self.check_columns(columns)
        lookup, read, extra = self._joined(i, columns)
        metadata = self._projected_metadata(columns)
        with self.open_shard(i) as pf, lookup or contextlib.nullcontext():
            for batch in self._iter_groups(pf, read, batch_size, start, stop):
                if lookup is not None:
                    batch = fill_audio(batch, lookup)
                    if extra:
                        batch = batch.drop_columns([ID])
                yield batch if metadata is None else batch.replace_schema_metadata(metadata)

    def _iter_groups(self, pf: pq.ParquetFile, columns: list[str] | None, batch_size: int, start: int,
                     stop: int | None) -> Iterator[pa.RecordBatch]:
        """Rows [start, stop) of an open shard, reading only the row groups that overlap."""
        meta = pf.metadata
        stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
        if start >= stop:
            return
        groups: list[int] = []
        first_row = None
        offset = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                if first_row is None:
                    first_row = offset
            offset += n
        if not groups:
            return
        assert first_row is not None
        skip, remaining = start - first_row, stop - start
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns,
                                     use_threads=True):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            if skip or batch.num_rows - skip > remaining:
                batch = batch.slice(skip, min(remaining, batch.num_rows - skip))
            skip = 0
            remaining -= batch.num_rows
            yield batch
            if remaining <= 0:
                return

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        """Stream the version's rows as record batches, shard after shard in manifest order.

        Reads through the store's pyarrow filesystem with range requests: memory holds about one
        row group, only the requested columns are fetched, and nothing is downloaded up front.
        """
        columns = self.check_columns(columns)
        for i in range(len(self.manifest.shards)):
            yield from self.iter_shard(i, columns, batch_size)

    def to_arrow(self, columns: list[str] | None = None) -> pa.Table:
        """The whole version (or some columns) as one in-memory table, shards in manifest order."""
        columns = self.check_columns(columns)
        tables = []
        for i in range(len(self.manifest.shards)):
            lookup, read, extra = self._joined(i, columns)
            with self.open_shard(i) as pf, lookup or contextlib.nullcontext():
                table = pf.read(columns=read, use_threads=True)
                if lookup is not None:
                    table = fill_audio(table, lookup)
                    table = table.drop_columns([ID]) if extra else table
            tables.append(table)
        metadata = self._projected_metadata(columns)
        if not tables:
            schema = self.schema
            return schema.empty_table() if columns is None else pa.schema(
                [schema.field(c) for c in columns], metadata=metadata).empty_table()
        table = pa.concat_tables(tables)
        return table if metadata is None else table.replace_schema_metadata(metadata)

    def torch_dataset(self, **kwargs: Any) -> SpeechPairsIterableDataset:
        """A torch IterableDataset over this version (needs torch; see storage.torch_dataset)."""
        from storage.torch_dataset import SpeechPairsIterableDataset

        return SpeechPairsIterableDataset(self, **kwargs)
