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
    <dataset>/data/<run-id>/train-00003-<sha256[:16]>.parquet   a finished shard's rows (immutable)
                           /quarantine-00003-<sha256[:16]>.parquet  its quarantine rows (immutable)
    <dataset>/audio/<clip-key>-<sha256[:16]>.parquet          a shard's measured clips and their audio (immutable)
                   /<clip-key>.json                           that clip cache's index, written last

Audio is stored once: a shard's clips are measured and encoded once per clip key (the shard's clip
references, the corpus fingerprint, the measuring settings and extractor versions; tasks/clip_cache.py)
and every later run with the same key (another LLM, other instructions, bins or describe settings)
reuses the file; row shards name it (ShardInfo.audio) and keep no audio bytes of their own.

The shard task uploads each shard once, to its data key (the content hash in the name: a retried
attempt with other bytes never overwrites a file a marker or manifest references); a commit then
only references it (manifest layout 2). `shards/` and `quarantine/` under the staging prefix are
where runs staged before that change (a resumed old run still has them; the commit copies those).
A resumed run finds its shards, markers and cache by these names, so they never change without a
migration. Version prefixes (`<dataset>/vNNNN/…`, `refs/`) are storage/versions.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
STAGING_DIR = "_staging"
DATA_DIR = "data"
# `<dataset>/data/<run-id>/<file>`: a data object written by a shard task (what a layout-2 manifest lists).
_DATA_KEY_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)/data/([^/]+)/([^/]+\.parquet)$")
PLAN = "plan.json"
LEASE = "lease.json"
REFUSED = "refused.json"
COMMITTED = "committed.json"
CACHE_DIR = "llm-cache"
AUDIO_DIR = "audio"
_CLIP_KEY_RE = re.compile(r"^[0-9a-f]{16,64}$")
# `<clip-key>-<sha256[:16]>.parquet` (an audio file) or `<clip-key>.json` (its index), under audio_prefix.
_AUDIO_NAME_RE = re.compile(r"^([0-9a-f]{16,64})(?:-[0-9a-f]{16}\.parquet|\.json)$")


def check_dataset(dataset: str) -> str:
    if not DATASET_RE.match(dataset):
        raise ValueError(f"invalid dataset name {dataset!r} (allowed: letters, digits, '.', '_', '-')")
    return dataset


def data_prefix(dataset: str, run_id: str) -> str:
    """Where a run's shard tasks put their immutable data objects (`<dataset>/data/<run-id>/`)."""
    if not run_id or "/" in run_id:
        raise ValueError(f"invalid run id {run_id!r}")
    return f"{check_dataset(dataset)}/{DATA_DIR}/{run_id}/"


def data_key(dataset: str, run_id: str, kind: str, index: int, sha256: str) -> str:
    """The data key of shard `index`'s rows (`kind` "train") or quarantine rows ("quarantine")."""
    return f"{data_prefix(dataset, run_id)}{kind}-{_shard(index)}-{sha256[:16]}.parquet"


def is_data_key(key: str) -> bool:
    """True for a root-relative data key (`<dataset>/data/<run-id>/<file>.parquet`)."""
    return _DATA_KEY_RE.match(key) is not None


def data_run(dataset: str, key: str) -> str | None:
    """The run id whose data prefix of `dataset` holds `key`, or None (for gc)."""
    m = _DATA_KEY_RE.match(key)
    return m.group(2) if m and m.group(1) == dataset else None


def audio_prefix(dataset: str) -> str:
    """Where the audio files and clip-cache indexes of `dataset`'s runs live."""
    return f"{check_dataset(dataset)}/{AUDIO_DIR}/"


def _clip_key(key: str) -> str:
    if not _CLIP_KEY_RE.match(key):
        raise ValueError(f"invalid clip key {key!r}")
    return key


def audio_file_key(dataset: str, clip_key: str, sha256: str) -> str:
    """A shard's audio file (immutable: its content hash in the name)."""
    return f"{audio_prefix(dataset)}{_clip_key(clip_key)}-{sha256[:16]}.parquet"


def clip_index_key(dataset: str, clip_key: str) -> str:
    """The clip cache index of `clip_key` (names the audio file; written after it)."""
    return f"{audio_prefix(dataset)}{_clip_key(clip_key)}.json"


def audio_clip_key(dataset: str, key: str) -> str | None:
    """The clip key of an audio file or clip index of `dataset` (`key` root-relative), or None."""
    prefix = audio_prefix(dataset)
    m = _AUDIO_NAME_RE.match(key[len(prefix):]) if key.startswith(prefix) else None
    return m.group(1) if m else None


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

    @property
    def dataset(self) -> str:
        return self.staging.split("/", 1)[0]

    @property
    def run_id(self) -> str:
        return self.staging.rsplit("/", 1)[1]

    def data_shard(self, index: int, sha256: str) -> str:
        """Shard `index`'s rows, uploaded once by the shard task (its content hash in the name)."""
        return data_key(self.dataset, self.run_id, "train", index, sha256)

    def data_quarantine(self, index: int, sha256: str) -> str:
        """Shard `index`'s quarantine rows, uploaded once by the shard task."""
        return data_key(self.dataset, self.run_id, "quarantine", index, sha256)

    def shard(self, index: int) -> str:
        """Where runs staged a shard's rows before data keys (a resumed old run's markers name it)."""
        return f"{self.staging}/shards/train-{_shard(index)}.parquet"

    def quarantine_part(self, index: int) -> str:
        """Where runs staged quarantine rows before data keys."""
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
