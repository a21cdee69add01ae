"""Where a run keeps its work in progress: every key of a staging area, built here and only here.

    <dataset>/_staging/<run-id>/plan.json                      the run's plan, written last
                               /plan/shard-00003.json          each shard's clip references
                               /shards/train-00003.parquet     a finished shard's rows
                               /quarantine/part-00003.parquet  its quarantine rows
                               /markers/shard-00003.json       its completion marker (outcome)
                               /llm-cache/<scope>/…            finished LLM requests (tasks/llm/cache.py)
                               /lease.json                     one launch at a time (storage/lease.py)
                               /refused.json                   the commit gate said no (kept for the re-run)
                               /committed.json                 the version this run committed
    <dataset>/_staging/probe-<token>                            preflight's write probe

A resumed run finds its shards, markers and cache by these names, so they never change without a
migration. Version prefixes (`<dataset>/vNNNN/…`, `refs/`) are storage/versions.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.versions import check_dataset

STAGING_DIR = "_staging"
PLAN = "plan.json"
LEASE = "lease.json"
REFUSED = "refused.json"
COMMITTED = "committed.json"
CACHE_DIR = "llm-cache"


def staging_prefix(dataset: str, run_id: str) -> str:
    """Where a run keeps in-progress shards and completion markers."""
    return f"{check_dataset(dataset)}/{STAGING_DIR}/{run_id}"


def staging_run(dataset: str, key: str) -> str | None:
    """The staging prefix (with its trailing `/`) a key of `dataset` lies under, or None (for gc)."""
    parts = key[len(dataset) + 1:].split("/")
    if len(parts) >= 3 and parts[0] == STAGING_DIR and parts[1]:
        return f"{dataset}/{STAGING_DIR}/{parts[1]}/"
    return None


def probe_key(dataset: str, token: str) -> str:
    """A throwaway object in the dataset's staging area (preflight writes and deletes it)."""
    return f"{dataset}/{STAGING_DIR}/probe-{token}"


def cache_scope_prefix(prefix: str, scope: str) -> str:
    """Where the LLM cache segments of one scope live: `<prefix>/llm-cache/<scope>/`."""
    head = prefix.strip("/")
    return f"{head + '/' if head else ''}{CACHE_DIR}/{scope}/"


def _shard(index: int) -> str:
    return f"{index:05d}"


@dataclass(frozen=True)
class RunLayout:
    """The keys of one run's staging area (`staging`: staging_prefix(dataset, run_id))."""

    staging: str

    @property
    def plan(self) -> str:
        return f"{self.staging}/{PLAN}"

    def shard_plan(self, index: int) -> str:
        return f"{self.staging}/plan/shard-{_shard(index)}.json"

    def shard(self, index: int) -> str:
        return f"{self.staging}/shards/train-{_shard(index)}.parquet"

    def quarantine_part(self, index: int) -> str:
        return f"{self.staging}/quarantine/part-{_shard(index)}.parquet"

    @property
    def markers(self) -> str:
        """The prefix every completion marker starts with (list it to count finished shards)."""
        return f"{self.staging}/markers/shard-"

    def marker(self, index: int) -> str:
        return f"{self.markers}{_shard(index)}.json"

    @staticmethod
    def cache_scope(index: int) -> str:
        """The LLM cache scope of a shard: a resumed shard reads its own results, not the run's."""
        return f"shard-{_shard(index)}"

    @property
    def lease(self) -> str:
        return f"{self.staging}/{LEASE}"

    @property
    def refused(self) -> str:
        return f"{self.staging}/{REFUSED}"

    @property
    def committed(self) -> str:
        return f"{self.staging}/{COMMITTED}"
