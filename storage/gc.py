"""The janitor: remove abandoned staging runs and uncommitted version prefixes of one dataset.

What goes (only when its newest object is older than the threshold):
- `<dataset>/_staging/<run-id>/…`: a run's in-progress shards, plans and completion markers;
- `<dataset>/vNNNN/…` WITHOUT `manifest.json`: copies left by a commit that never published.
  The `_claim` marker itself is kept as a tombstone: versions.py relies on a claim never being
  reusable, so a stalled publisher that wakes up can never share a prefix with a new one.
What never goes: anything under a version with a manifest (committed) and anything under `refs/`.

Ages come from the store's own timestamps (file mtime, S3 LastModified), listed in one pass.
Right before a prefix is deleted its newest timestamp is read again, so a run that resumed in
the meantime is left alone.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from storage.layout import staging_run
from storage.lease import read_lease
from storage.objectstore import ObjectInfo, ObjectStore
from storage.versions import CLAIM_PATH, MANIFEST_PATH, VERSION_RE, check_dataset

log = logging.getLogger(__name__)


class GcPrefix(BaseModel):
    prefix: str  # store key prefix, e.g. demo/_staging/run-…/ or demo/v0007/
    kind: Literal["staging", "uncommitted"]
    objects: int  # objects removed (or that would be, on a dry run)
    bytes: int
    newest: datetime
    age_s: float


class GcReport(BaseModel):
    dataset: str
    older_than_s: float
    dry_run: bool
    removed: list[GcPrefix] = Field(default_factory=list)
    kept_young: list[GcPrefix] = Field(default_factory=list)  # garbage candidates not old enough yet
    committed_versions: list[str] = Field(default_factory=list)  # seen and left alone

    @property
    def objects_removed(self) -> int:
        return sum(p.objects for p in self.removed)

    @property
    def bytes_removed(self) -> int:
        return sum(p.bytes for p in self.removed)


def _group(dataset: str, key: str) -> tuple[str, Literal["staging", "version"]] | None:
    """The collectable prefix a key belongs to, or None (refs, anything unknown)."""
    staging = staging_run(dataset, key)
    if staging is not None:
        return staging, "staging"
    parts = key[len(dataset) + 1:].split("/")
    if len(parts) >= 2 and VERSION_RE.match(parts[0]):
        return f"{dataset}/{parts[0]}/", "version"
    return None


def collect_garbage(store: ObjectStore, dataset: str, older_than_s: float, *, dry_run: bool = False,
                    now: float | None = None) -> GcReport:
    """Remove staging runs and uncommitted version prefixes whose newest object is older than
    `older_than_s` seconds (relative to `now`, epoch seconds, default the current time)."""
    check_dataset(dataset)
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    clock = time.time() if now is None else now
    report = GcReport(dataset=dataset, older_than_s=older_than_s, dry_run=dry_run)

    groups: dict[str, tuple[Literal["staging", "version"], list[ObjectInfo]]] = {}
    for obj in store.list_info(f"{dataset}/"):
        found = _group(dataset, obj.key)
        if found is not None:
            groups.setdefault(found[0], (found[1], []))[1].append(obj)

    for prefix, (kind, objs) in sorted(groups.items()):
        names = {o.key[len(prefix):] for o in objs}
        if kind == "version" and MANIFEST_PATH in names:
            report.committed_versions.append(prefix.rstrip("/").rsplit("/", 1)[1])
            continue
        doomed = [o for o in objs if not (kind == "version" and o.key == prefix + CLAIM_PATH)]
        if not doomed:  # a bare claim tombstone: nothing to remove
            continue
        newest = max(o.mtime for o in objs)
        entry = GcPrefix(prefix=prefix, kind="staging" if kind == "staging" else "uncommitted",
                         objects=len(doomed), bytes=sum(o.size for o in doomed),
                         newest=datetime.fromtimestamp(newest, UTC), age_s=round(clock - newest, 3))
        if clock - newest <= older_than_s or (kind == "staging" and _live_lease(store, prefix, clock)):
            report.kept_young.append(entry)
            continue
        if not dry_run and not _remove(store, prefix, kind, older_than_s, clock):
            report.kept_young.append(entry)
            continue
        report.removed.append(entry)
        log.info("gc %s %s (%d objects, %d bytes, newest %s)%s", entry.kind, store.uri(prefix.rstrip("/")),
                 entry.objects, entry.bytes, entry.newest.isoformat(), " [dry run]" if dry_run else "")
    return report


def _live_lease(store: ObjectStore, prefix: str, clock: float) -> bool:
    """A run whose lease has not expired is working (or just died): its staging is never removed."""
    lease = read_lease(store, prefix.rstrip("/"))
    return lease is not None and lease.expires_at.timestamp() > clock


def _remove(store: ObjectStore, prefix: str, kind: str, older_than_s: float, clock: float) -> bool:
    """Delete one prefix after re-checking it is still old and still uncommitted; False if not."""
    objs = list(store.list_info(prefix))
    if not objs or clock - max(o.mtime for o in objs) <= older_than_s:
        return False
    if kind == "version" and any(o.key == prefix + MANIFEST_PATH for o in objs):
        return False
    for obj in objs:
        if kind == "version" and obj.key == prefix + CLAIM_PATH:
            continue  # the tombstone stays (see the module docstring)
        store.delete(obj.key)
    return True
