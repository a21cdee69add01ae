"""A run's identity and what every row of it shares: run id, staging area, versions (provenance).

The run id is `run-<config hash>-<corpus fingerprint>`: the same config over the same corpus is the
same run (a re-launch resumes its staging area), a changed corpus is a new one. One launch of a run
works at a time (its lease).
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

from schemas.canonical import canonical_config
from schemas.config import RunConfig
from storage.layout import RunLayout, staging_prefix
from storage.lease import RunLease
from storage.objectstore import ObjectStore, open_store
from tasks.audio import AUDIO_VERSION
from tasks.describe import DESCRIBE_VERSION, load_bins
from tasks.features import EXTRACTOR_VERSIONS
from tasks.features.models import load_models
from tasks.features.phonemes import PHONEME_VERSION
from tasks.ingest import source_fingerprint


class RunContext(BaseModel):
    """What every row of a run shares (provenance), computed once by the flow."""

    run_id: str
    staging: str
    config_hash: str
    pipeline_version: str
    bins_version: str
    extractor_versions: dict[str, str]
    corpus_fingerprint: str = ""  # the sources' content (tasks/clip_cache.py keys measured clips by it)
    # An earlier attempt of this run was refused at commit: shards with clips quarantined at a model
    # stage are redone too (commit_gate.shard_needs_redo), not only those with transient failures.
    after_refusal: bool = False

    @property
    def layout(self) -> RunLayout:
        """The keys of this run's staging area."""
        return RunLayout(self.staging)


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    version = metadata.version("speechpairs")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return f"{version}+g{sha}" if sha else version
    except (OSError, subprocess.SubprocessError):
        return version


def launch_config(config: RunConfig) -> RunConfig:
    """The config a run works with and is keyed by: canonical (schemas/canonical.py), relative paths
    resolved against this process's working directory (a CLI launch's, or a deployment worker's:
    the project directory), so both spellings of one corpus and settings are one run."""
    return canonical_config(config, Path.cwd())


def run_store(config: RunConfig) -> ObjectStore:
    """The output root the run writes to (staging and versions)."""
    return open_store(config.output.root, config.s3)


def run_context(config: RunConfig) -> RunContext:
    """The run this config makes (loads Whisper/classifiers: a missing model fails here, before any clip)."""
    config = launch_config(config)  # idempotent: the flow already runs with the canonical config
    config_hash = config.config_hash()
    # Same config + same corpus content = same run (resumable); a changed corpus is a new run.
    corpus = source_fingerprint(config.sources)
    run_id = f"run-{config_hash}-{corpus[:8]}"
    staging = staging_prefix(config.output.dataset, run_id)
    return RunContext(
        run_id=run_id,
        corpus_fingerprint=corpus,
        staging=staging,
        after_refusal=run_store(config).exists(RunLayout(staging).refused),
        config_hash=config_hash,
        pipeline_version=code_version(),
        bins_version=load_bins(config.describe.bins).full_version,
        extractor_versions={**EXTRACTOR_VERSIONS, "audio": AUDIO_VERSION, "describe": DESCRIBE_VERSION,
                            **({"phonemes": PHONEME_VERSION} if config.features.phoneme_rate else {}),
                            **load_models(config.features).versions()},
    )


def run_lease(config: RunConfig, store: ObjectStore, ctx: RunContext) -> RunLease:
    """The lease that lets one launch of the run work at a time (`output.when_running: wait` queues)."""
    return RunLease(store, ctx.staging, ctx.run_id, ttl_s=config.output.lease_s,
                    wait=config.output.when_running == "wait")
