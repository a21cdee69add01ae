"""Every byte to or from disk/S3: object store, shard writer, versions and the reader API."""

from storage.layout import RunLayout, staging_prefix
from storage.objectstore import LocalStore, NotFound, ObjectStore, PreconditionFailed, S3Store, open_store
from storage.reader import manifest_summary, open_manifest, parse_dataset_uri
from storage.shards import read_marker, write_marker, write_parquet_shard
from storage.versions import (
    CommitError,
    VersionNotFound,
    commit_version,
    list_versions,
    read_manifest,
    resolve_version,
    set_ref,
)

__all__ = [
    "CommitError",
    "LocalStore",
    "NotFound",
    "ObjectStore",
    "PreconditionFailed",
    "RunLayout",
    "S3Store",
    "VersionNotFound",
    "commit_version",
    "list_versions",
    "manifest_summary",
    "open_manifest",
    "open_store",
    "parse_dataset_uri",
    "read_manifest",
    "read_marker",
    "resolve_version",
    "set_ref",
    "staging_prefix",
    "write_marker",
    "write_parquet_shard",
]
