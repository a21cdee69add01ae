"""Consumer-side entry points: dataset URIs, manifests and a human summary of a version.

A dataset URI is `ROOT/DATASET[@REF]`, e.g. `./data/demo@v0001` or `s3://bucket/prefix/demo`;
REF is a version (v0003) or a ref/tag name and defaults to `latest`.
"""

from __future__ import annotations

from schemas.config import S3Config
from schemas.manifest import Manifest, ShardInfo
from storage.objectstore import open_store
from storage.versions import DATASET_RE, REF_RE, VERSION_RE, read_manifest, resolve_version


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


def open_manifest(uri: str, s3: S3Config | None = None) -> Manifest:
    """Resolve a dataset URI to its committed manifest (raises VersionNotFound if none)."""
    root, dataset, ref = parse_dataset_uri(uri)
    store = open_store(root, s3)
    return read_manifest(store, dataset, resolve_version(store, dataset, ref))


def _shard_lines(title: str, shards: list[ShardInfo]) -> list[str]:
    lines = [f"{title} ({len(shards)}):"]
    lines += [f"  {s.path}  rows={s.rows:,}  bytes={s.bytes:,}  sha256={s.sha256[:16]}…" for s in shards]
    return lines


def manifest_summary(manifest: Manifest) -> str:
    """A short human description of one version: what is in it and how it was made."""
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
    return "\n".join(lines)
