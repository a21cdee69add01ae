"""Immutable dataset versions: allocate, reference the shards, publish the manifest, move the ref.

Commit protocol (ARCHITECTURE.md, "Storage layout and commit protocol"), O(metadata):
1. claim `<dataset>/vNNNN/_claim` create-only; on conflict try N+1 (so concurrent commits never
   share a prefix; the claim stays forever, or a later writer could reuse the prefix);
2. check that every shard and quarantine part the shard tasks wrote is there with its size (one
   listing per run's data prefix: metadata, never bytes). Audio files the shards name were checked
   by the shard task (written, or found with their size through the clip cache) and gc keeps them
   while the run holds its lease; listing the dataset's whole audio prefix here would grow with
   every run ever made. The shard tasks uploaded them once, to
   immutable data keys `<dataset>/data/<run-id>/…-<sha256[:16]>.parquet` (storage/layout.py), with
   their sha256 taken while writing (and checked by S3 on upload); nothing is copied or re-read;
3. write the run's resolved config `config.yaml` (secrets redacted) and the dataset card
   `README.md` (create-only), so a visible version always has both; the manifest lists the config
   with its sha256, so `datasets verify` covers it;
4. write `manifest.json` LAST and create-only: this is the instant the version exists. It is
   layout 2: shard paths are those root-relative data keys (a later version, of any dataset, may
   list the same files);
5. move `refs/latest.json` forward by compare-and-swap.
A crash before 4 leaves only garbage (an unreferenced claim, card, config; data objects no manifest
lists), which storage/gc.py removes; readers never list prefixes, they go through refs and
manifests and resolve every listed file with `file_key`. A run staged by the code before data keys
(markers naming `_staging/<run-id>/shards/…`) is committed as before: its shards are copied into
the version prefix and each copy's sha256 re-verified (manifest layout 1, still read unchanged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.canonical import redact_secrets
from schemas.manifest import FileInfo, Lineage, Manifest, Ref, ShardInfo, Stats
from schemas.records import utc_now
from storage.card import render_card
from storage.layout import DATASET_RE, check_dataset, is_data_key
from storage.objectstore import NotFound, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

__all__ = ["DATASET_RE", "check_dataset"]  # re-exported: their home is storage/layout.py

VERSION_RE = re.compile(r"^v(\d{4,})$")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_CLAIM_TRIES = 1000
MAX_REF_TRIES = 50


class CommitError(RuntimeError):
    """The commit could not be completed; no manifest was published by it."""


class VersionNotFound(NotFound):
    """A ref or version that does not resolve to a committed manifest."""


def version_name(n: int) -> str:
    return f"v{n:04d}"


def version_number(version: str) -> int:
    m = VERSION_RE.match(version)
    if not m:
        raise ValueError(f"not a version name: {version!r} (expected v0001, v0002, …)")
    return int(m.group(1))


# The keys of a version, relative to its prefix: the version manifest (the instant the version
# exists), the dataset card, the recorded run config, the claim tombstone, the copied shards.
MANIFEST_PATH = "manifest.json"
CARD_PATH = "README.md"
CONFIG_PATH = "config.yaml"
CLAIM_PATH = "_claim"


def data_path(index: int, total: int) -> str:
    return f"data/train-{index:05d}-of-{total:05d}.parquet"


def quarantine_path(index: int) -> str:
    return f"quarantine/part-{index:05d}.parquet"


def version_prefix(dataset: str, version: str) -> str:
    version_number(version)
    return f"{check_dataset(dataset)}/{version}"


def version_key(dataset: str, version: str, path: str) -> str:
    """The store key of `path` (relative, as the version manifest lists it) in a version."""
    return f"{version_prefix(dataset, version)}/{path}"


LAYOUT_IN_VERSION = 1  # shards copied into the version prefix; paths relative to it
LAYOUT_DATA_KEYS = 2  # shards referenced where the shard tasks wrote them; paths root-relative


def file_key(manifest: Manifest, info: ShardInfo) -> str:
    """The store key of a shard or quarantine part a manifest lists, whatever its layout: every
    reader resolves listed files through here."""
    if manifest.layout == LAYOUT_IN_VERSION:
        return version_key(manifest.lineage.dataset, manifest.lineage.version, info.path)
    if manifest.layout == LAYOUT_DATA_KEYS:
        return info.path
    raise ValueError(f"{manifest.lineage.dataset} {manifest.lineage.version}: manifest layout {manifest.layout} "
                     "is newer than this speechpairs understands (upgrade it)")


def manifest_key(dataset: str, version: str) -> str:
    return version_key(dataset, version, MANIFEST_PATH)


def card_key(dataset: str, version: str) -> str:
    return version_key(dataset, version, CARD_PATH)


def config_key(dataset: str, version: str) -> str:
    return version_key(dataset, version, CONFIG_PATH)


def claim_key(dataset: str, version: str) -> str:
    return version_key(dataset, version, CLAIM_PATH)


def versions_prefix(dataset: str) -> str:
    """What every version prefix of `dataset` starts with (listing it finds the committed ones)."""
    return f"{check_dataset(dataset)}/v"


def refs_prefix(dataset: str) -> str:
    return f"{check_dataset(dataset)}/refs/"


def ref_key(dataset: str, name: str) -> str:
    if not REF_RE.match(name) or VERSION_RE.match(name):
        raise ValueError(f"invalid ref name {name!r}")
    return f"{refs_prefix(dataset)}{name}.json"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_ref(store: ObjectStore, dataset: str, name: str = "latest") -> tuple[Ref, str] | None:
    """The ref and its etag (for compare-and-swap), or None if the ref does not exist."""
    try:
        data, etag = store.get_with_etag(ref_key(dataset, name))
    except NotFound:
        return None
    return Ref.model_validate_json(data), etag


def resolve_version(store: ObjectStore, dataset: str, ref: str = "latest") -> str:
    """'latest' / a tag → 'v0003'; 'v0003' → itself. Raises VersionNotFound if not committed."""
    if VERSION_RE.match(ref):
        version = ref
    else:
        found = read_ref(store, dataset, ref)
        if found is None:
            raise VersionNotFound(f"dataset {dataset!r} has no ref {ref!r} under {store.root}")
        version = found[0].version
    if not store.exists(manifest_key(dataset, version)):
        raise VersionNotFound(f"dataset {dataset!r} has no committed version {version!r} under {store.root}")
    return version


def read_manifest(store: ObjectStore, dataset: str, version: str) -> Manifest:
    try:
        data = store.get_bytes(manifest_key(dataset, version))
    except NotFound:
        raise VersionNotFound(f"dataset {dataset!r} has no committed version {version!r}") from None
    return Manifest.model_validate_json(data)


def read_config(store: ObjectStore, manifest: Manifest) -> dict[str, Any] | None:
    """The run config recorded with a version, or None for a version committed before configs were
    recorded. Raises NotFound if the manifest lists a config file that is gone, ValueError if
    its bytes no longer match the manifest's sha256 (`datasets verify` names both)."""
    if manifest.config is None:
        return None
    data = store.get_bytes(version_key(manifest.lineage.dataset, manifest.lineage.version, manifest.config.path))
    if hashlib.sha256(data).hexdigest() != manifest.config.sha256:
        raise ValueError(f"{manifest.lineage.dataset} {manifest.lineage.version}: {manifest.config.path} does "
                         "not match the manifest's sha256 (run `speechpairs datasets verify`)")
    loaded = yaml.safe_load(data)
    return loaded if isinstance(loaded, dict) else None


def render_config(config: Mapping[str, Any], dataset: str, version: str) -> bytes:
    """config.yaml: a comment naming the version, then every setting in the model's order, redacted."""
    head = (f"# The resolved run config of {dataset} {version}: every setting (defaults filled in, local "
            "paths absolute),\n# anything that looks like a credential replaced by ***.\n")
    body = yaml.safe_dump(redact_secrets(dict(config)), sort_keys=False, allow_unicode=True, width=1000)
    return (head + body).encode()


def list_versions(store: ObjectStore, dataset: str) -> list[str]:
    """Committed versions (those with a manifest), oldest first. Lists keys: an admin call."""
    pattern = re.compile(rf"^{re.escape(check_dataset(dataset))}/(v\d{{4,}})/{re.escape(MANIFEST_PATH)}$")
    found = {m.group(1) for key in store.list(versions_prefix(dataset)) if (m := pattern.match(key))}
    return sorted(found, key=version_number)


# --------------------------------------------------------------------------------------------
# Refs
# --------------------------------------------------------------------------------------------


def set_ref(store: ObjectStore, dataset: str, version: str, name: str = "latest", *,
            only_forward: bool = True) -> bool:
    """Point refs/<name>.json at `version` by compare-and-swap; True if it now points there.

    With `only_forward` a ref already at a newer version is left alone (a later commit won).
    """
    if not store.exists(manifest_key(dataset, version)):
        raise VersionNotFound(f"cannot point {name!r} at uncommitted version {version!r}")
    key = ref_key(dataset, name)
    payload = Ref(version=version).model_dump_json(indent=2).encode()
    for attempt in range(MAX_REF_TRIES):
        current = read_ref(store, dataset, name)
        try:
            if current is None:
                store.put_bytes(key, payload, if_none_match=True)
                return True
            ref, etag = current
            if ref.version == version:
                return True
            if only_forward and version_number(ref.version) > version_number(version):
                log.info("ref %s of %s already at newer %s; leaving it", name, dataset, ref.version)
                return False
            store.put_bytes(key, payload, if_match=etag)
            return True
        except PreconditionFailed:
            time.sleep(min(0.05 * 2**attempt, 1.0))  # lost a race: re-read and decide again
    raise CommitError(f"could not move ref {name!r} of {dataset!r} to {version} after {MAX_REF_TRIES} tries")


# --------------------------------------------------------------------------------------------
# Commit
# --------------------------------------------------------------------------------------------


def unreferenced_manifest_of_run(store: ObjectStore, dataset: str, run_id: str, start: int) -> Manifest | None:
    """A manifest this run already wrote at a version ≥ `start` (newer than `latest`), if any."""
    for version in list_versions(store, dataset):
        if version_number(version) >= start:
            manifest = read_manifest(store, dataset, version)
            if manifest.lineage.run_id == run_id:
                return manifest
    return None


def _claim_version(store: ObjectStore, dataset: str, start: int, run_id: str) -> str:
    body = json.dumps({"run_id": run_id, "claimed_at": utc_now().isoformat()}).encode()
    for n in range(start, start + MAX_CLAIM_TRIES):
        version = version_name(n)
        try:
            store.put_bytes(claim_key(dataset, version), body, if_none_match=True)
            return version
        except PreconditionFailed:
            if _own_unfinished_claim(store, dataset, version, run_id):
                # An earlier attempt of this run claimed it and died before its manifest: take it up
                # again (its shards are byte-identical; the create-only manifest settles any race).
                return version
            continue
    raise CommitError(f"no free version slot for {dataset!r} in {MAX_CLAIM_TRIES} tries from {version_name(start)}")


def _own_unfinished_claim(store: ObjectStore, dataset: str, version: str, run_id: str) -> bool:
    try:
        claim = json.loads(store.get_bytes(claim_key(dataset, version)))
    except (NotFound, ValueError):
        return False
    return claim.get("run_id") == run_id and not store.exists(manifest_key(dataset, version))


def _copy_verified(store: ObjectStore, src: ShardInfo, dst_key: str, rel_path: str) -> ShardInfo:
    """A shard staged by the code before data keys: copied into the version, the copy re-read."""
    store.copy(src.path, dst_key)
    size = store.size(dst_key)
    digest = store.sha256(dst_key)
    if size != src.bytes or digest != src.sha256:
        raise CommitError(f"copy of {src.path} to {store.uri(dst_key)} does not verify "
                          f"(bytes {size} vs {src.bytes}, sha256 {digest[:12]} vs {src.sha256[:12]})")
    return ShardInfo(path=rel_path, rows=src.rows, bytes=src.bytes, sha256=src.sha256)


def _check_present(store: ObjectStore, files: list[ShardInfo]) -> None:
    """Every data object is there with its manifest size: one listing per data prefix (metadata
    only), so a manifest never points at a missing object. Its bytes were checksummed when written."""
    by_prefix: dict[str, list[ShardInfo]] = {}
    for info in files:
        by_prefix.setdefault(info.path.rsplit("/", 1)[0] + "/", []).append(info)
    for prefix, infos in by_prefix.items():
        sizes = {o.key: o.size for o in store.list_info(prefix)}
        for info in infos:
            size = sizes.get(info.path)
            if size != info.bytes:
                found = "missing" if size is None else f"{size:,} bytes"
                raise CommitError(f"{store.uri(info.path)} is {found}, the shard task recorded {info.bytes:,} "
                                  "bytes; not publishing")


def _write_once(store: ObjectStore, key: str, body: bytes, dataset: str, version: str, run_id: str) -> None:
    """The card and the config go in before the manifest, create-only: a lost answer to our own
    write is fine, and so is a file left by an earlier attempt of this run (rewritten); any other
    is a conflict."""
    try:
        store.put_bytes(key, body, if_none_match=True)
    except PreconditionFailed:
        if store.get_bytes(key) == body:
            return
        if not _own_unfinished_claim(store, dataset, version, run_id):
            raise CommitError(f"{store.uri(key)} was written by another run") from None
        store.put_bytes(key, body)


def commit_version(store: ObjectStore, *, dataset: str, staged_shards: list[ShardInfo],
                   staged_quarantine: list[ShardInfo], lineage: dict, stats: Stats, arrow_schema_b64: str,
                   hf_features: dict, config: Mapping[str, Any] | None = None,
                   layout: int | None = None) -> Manifest:
    """Publish staged shards as the next immutable version and move `latest` to it.

    `staged_*[i].path` are store keys: data keys (storage/layout.py) are referenced as they are
    (manifest layout 2); if any is a key of the old staging layout, every file is copied into the
    version prefix and verified, as before data keys (layout 1). `lineage` needs every Lineage field but
    dataset/version/parent, which are filled in here; `config` (the run's resolved settings) is
    stored as config.yaml, redacted, and listed in the manifest. `layout=LAYOUT_DATA_KEYS` references
    every file as given, whatever root-relative key it has (storage/compose.py: shards of other
    versions). Returns the published manifest.
    """
    check_dataset(dataset)
    try:  # validate before touching the store, so a bad lineage leaves nothing behind
        draft = Lineage.model_validate({**lineage, "dataset": dataset, "version": "v0000", "parent": None})
    except ValidationError as exc:
        raise ValueError(f"incomplete lineage for commit: {exc}") from None

    current = read_ref(store, dataset, "latest")
    parent = current[0].version if current else None
    start = version_number(parent) + 1 if parent else 1
    landed = unreferenced_manifest_of_run(store, dataset, draft.run_id, start)
    if landed is not None:
        # An earlier attempt of this run died between its manifest and moving `latest`: finish it.
        log.info("%s %s was committed by this run before it stopped; moving latest to it", dataset,
                 landed.lineage.version)
        set_ref(store, dataset, landed.lineage.version, "latest", only_forward=True)
        return landed
    version = _claim_version(store, dataset, start, draft.run_id)
    prefix = version_prefix(dataset, version)
    log.info("committing %s %s (parent %s) to %s", dataset, version, parent, store.uri(prefix))

    if layout == LAYOUT_DATA_KEYS or all(is_data_key(s.path) for s in [*staged_shards, *staged_quarantine]):
        layout = LAYOUT_DATA_KEYS
        _check_present(store, [*staged_shards, *staged_quarantine])
        shards = [s.model_copy() for s in staged_shards]
        quarantine = [s.model_copy() for s in staged_quarantine]
    else:  # a run staged before data keys (resumed by this code): copy and re-verify, as then
        layout = LAYOUT_IN_VERSION
        total = len(staged_shards)
        shards = []
        for i, staged in enumerate(staged_shards):
            rel = data_path(i, total)
            shards.append(_copy_verified(store, staged, version_key(dataset, version, rel), rel))
        quarantine = []
        for i, staged in enumerate(staged_quarantine):
            rel = quarantine_path(i)
            quarantine.append(_copy_verified(store, staged, version_key(dataset, version, rel), rel))

    config_info = None
    if config is not None:
        body = render_config(config, dataset, version)
        _write_once(store, config_key(dataset, version), body, dataset, version, draft.run_id)
        config_info = FileInfo(path=CONFIG_PATH, bytes=len(body), sha256=hashlib.sha256(body).hexdigest())

    manifest = Manifest(
        layout=layout,
        lineage=draft.model_copy(update={"version": version, "parent": parent}),
        stats=stats,
        shards=shards,
        quarantine=quarantine,
        arrow_schema=arrow_schema_b64,
        hf_features=hf_features,
        config=config_info,
    )
    _write_once(store, card_key(dataset, version), render_card(manifest).encode(), dataset, version,
                draft.run_id)
    body = manifest.model_dump_json(indent=2).encode()
    try:
        store.put_bytes(manifest_key(dataset, version), body, if_none_match=True)
    except PreconditionFailed:
        # Our own write may have landed with its answer lost; anything else is a real conflict.
        existing = read_manifest(store, dataset, version)
        if existing.lineage.run_id != manifest.lineage.run_id or existing.shards != manifest.shards:
            raise CommitError(f"{store.uri(manifest_key(dataset, version))} was written by another run") from None
        manifest = existing

    set_ref(store, dataset, version, "latest", only_forward=True)
    log.info("committed %s %s: %d shards, %d rows, %d quarantined", dataset, version, len(shards),
             manifest.stats.rows, manifest.stats.quarantined)
    return manifest
