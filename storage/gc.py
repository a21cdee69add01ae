"""The janitor: remove what nothing reaches, from one dataset's prefix of a root.

What goes (only when its newest object is older than the threshold):
- `<dataset>/_staging/<run-id>/…`: a run's plans, completion markers, cache (and, for runs staged
  before data keys, its shards), unless the run's lease is live;
- `<dataset>/vNNNN/…` WITHOUT `manifest.json`: the claim's card/config (or copies, layout 1) left
  by a commit that never published. The `_claim` marker itself is kept as a tombstone: versions.py
  relies on a claim never being reusable, so a stalled publisher that wakes up can never share a
  prefix with a new one;
- `<dataset>/data/<run-id>/…` objects (written once by shard tasks, storage/layout.py) that no
  committed manifest of ANY dataset under the root lists, each older than the threshold, and only
  once the run's staging is gone or removed in this pass (a run still resumable or holding a live
  lease claims its data objects: its markers name them). Refs and tags only point at committed
  versions, so what they reach is what those manifests list.
- `<dataset>/audio/<clip-key>-<sha16>.parquet` audio files (audio stored once, shared by runs and
  versions) that no committed manifest of ANY dataset lists as a shard's `.audio`, that no
  completion marker of a run whose staging survives this pass claims (`shard.audio.path`), each
  older than the threshold; and while a run of the dataset holds a live lease, an audio file its
  clip index still names stays too (that run may have found it through the index and not yet
  written the marker that claims it). A clip index (`<clip-key>.json`, the regeneration cache) stays
  as long as the audio file it names stays and goes with it; an old index naming a file that is gone
  goes alone (a run finding it would measure afresh anyway).
What never goes: anything under a version with a manifest (committed), anything under `refs/`, and
any object a committed manifest lists (row shard, quarantine part or audio file).

Ages come from the store's own timestamps (file mtime, S3 LastModified), listed in one pass.
Right before a prefix is deleted its newest timestamp is read again, so a run that resumed in
the meantime is left alone; before data objects go, manifests committed since the scan are read
and the run's lease and staging checked again; before audio files go, the manifests and the
surviving runs' markers are read again and the leases checked again.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from storage.layout import (
    LEASE,
    STAGING_DIR,
    audio_clip_key,
    audio_prefix,
    data_prefix,
    data_run,
    staging_prefix,
    staging_run,
)
from storage.lease import read_lease
from storage.objectstore import NotFound, ObjectInfo, ObjectStore
from storage.shards import read_marker
from storage.versions import CLAIM_PATH, LAYOUT_DATA_KEYS, MANIFEST_PATH, VERSION_RE, check_dataset
from storage.versions import read_manifest as _read_manifest

log = logging.getLogger(__name__)

_MANIFEST_KEY_RE = re.compile(rf"^([^/]+)/(v\d{{4,}})/{re.escape(MANIFEST_PATH)}$")
_MARKER_RE = re.compile(r"/markers/shard-\d+\.json$")
Kind = Literal["staging", "version", "data", "audio"]  # what a key of the dataset belongs to
EntryKind = Literal["staging", "uncommitted", "data", "audio"]  # what a report entry removes or keeps


class GcPrefix(BaseModel):
    prefix: str  # store key prefix, e.g. demo/_staging/run-…/, demo/v0007/ or demo/data/run-…/
    kind: EntryKind
    objects: int  # objects removed (or that would be, on a dry run)
    bytes: int
    newest: datetime
    age_s: float


class GcReport(BaseModel):
    dataset: str
    older_than_s: float
    dry_run: bool
    removed: list[GcPrefix] = Field(default_factory=list)
    kept_young: list[GcPrefix] = Field(default_factory=list)  # garbage candidates not old enough / claimed
    committed_versions: list[str] = Field(default_factory=list)  # seen and left alone
    referenced_objects: int = 0  # data objects of this dataset a committed manifest lists (kept)
    referenced_audio: int = 0  # audio files of this dataset a manifest lists or a surviving run claims (kept)

    @property
    def objects_removed(self) -> int:
        return sum(p.objects for p in self.removed)

    @property
    def bytes_removed(self) -> int:
        return sum(p.bytes for p in self.removed)


def _group(dataset: str, key: str) -> tuple[str, Kind] | None:
    """The collectable prefix a key belongs to, or None (refs, anything unknown)."""
    staging = staging_run(dataset, key)
    if staging is not None:
        return staging, "staging"
    run = data_run(dataset, key)
    if run is not None:
        return data_prefix(dataset, run), "data"
    if key.startswith(audio_prefix(dataset)):  # one clip key: its audio file(s) and index
        clip_key = audio_clip_key(dataset, key)
        return (audio_prefix(dataset) + clip_key, "audio") if clip_key else None
    parts = key[len(dataset) + 1:].split("/")
    if len(parts) >= 2 and VERSION_RE.match(parts[0]):
        return f"{dataset}/{parts[0]}/", "version"
    return None


class _References:
    """Every data key and audio file the committed manifests under the root list (each manifest read once)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.seen: set[str] = set()
        self.keys: set[str] = set()
        self.audio: set[str] = set()

    def refresh(self) -> set[str]:
        """Read the manifests committed since the last call; the referenced keys so far.

        Lists only each dataset's version prefixes (`<dataset>/v…`), never its data, audio or
        staging objects: a scan costs the root's versions, not its shards."""
        keys = (k for name in self.store.list_dirs("") for k in self.store.list(f"{name}/v"))
        for key in keys:
            m = _MANIFEST_KEY_RE.match(key)
            if m is None or key in self.seen:
                continue
            self.seen.add(key)
            try:
                manifest = _read_manifest(self.store, m.group(1), m.group(2))
            except NotFound:
                continue
            if manifest.layout == LAYOUT_DATA_KEYS:
                self.keys.update(s.path for s in [*manifest.shards, *manifest.quarantine])
            # Audio files are root-relative keys whatever the layout (file_key of a layout-2 path).
            self.audio.update(s.audio.path for s in manifest.shards if s.audio is not None)
        return self.keys


def _entry(prefix: str, kind: EntryKind, doomed: list[ObjectInfo],
           newest: float, clock: float) -> GcPrefix:
    return GcPrefix(prefix=prefix, kind=kind, objects=len(doomed), bytes=sum(o.size for o in doomed),
                    newest=datetime.fromtimestamp(newest, UTC), age_s=round(clock - newest, 3))


def collect_garbage(store: ObjectStore, dataset: str, older_than_s: float, *, dry_run: bool = False,
                    now: float | None = None) -> GcReport:
    """Remove staging runs, uncommitted version prefixes and unreferenced data objects older than
    `older_than_s` seconds (relative to `now`, epoch seconds, default the current time)."""
    check_dataset(dataset)
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    clock = time.time() if now is None else now
    report = GcReport(dataset=dataset, older_than_s=older_than_s, dry_run=dry_run)

    groups: dict[str, tuple[Kind, list[ObjectInfo]]] = {}
    for obj in store.list_info(f"{dataset}/"):
        found = _group(dataset, obj.key)
        if found is not None:
            groups.setdefault(found[0], (found[1], []))[1].append(obj)

    surviving_staging: set[str] = set()  # staging prefixes still there after this pass
    for prefix, (kind, objs) in sorted(groups.items()):
        if kind in ("data", "audio"):  # collected after the staging pass, which decides what runs survive
            continue
        names = {o.key[len(prefix):] for o in objs}
        if kind == "version" and MANIFEST_PATH in names:
            report.committed_versions.append(prefix.rstrip("/").rsplit("/", 1)[1])
            continue
        doomed = [o for o in objs if not (kind == "version" and o.key == prefix + CLAIM_PATH)]
        if not doomed:  # a bare claim tombstone: nothing to remove
            continue
        newest = max(o.mtime for o in objs)
        entry = _entry(prefix, "staging" if kind == "staging" else "uncommitted", doomed, newest, clock)
        if (clock - newest <= older_than_s or (kind == "staging" and _live_lease(store, prefix, clock))
                or (not dry_run and not _remove(store, prefix, kind, older_than_s, clock))):
            report.kept_young.append(entry)
            if kind == "staging":
                surviving_staging.add(prefix)
            continue
        report.removed.append(entry)
        log.info("gc %s %s (%d objects, %d bytes, newest %s)%s", entry.kind, store.uri(prefix.rstrip("/")),
                 entry.objects, entry.bytes, entry.newest.isoformat(), " [dry run]" if dry_run else "")

    data_groups = sorted((p, objs) for p, (kind, objs) in groups.items() if kind == "data")
    audio_groups = sorted((p, objs) for p, (kind, objs) in groups.items() if kind == "audio")
    if data_groups or audio_groups:
        refs = _References(store)
        referenced = refs.refresh()
        for prefix, objs in data_groups:
            _collect_data(store, report, refs, referenced, prefix, objs, surviving_staging, clock)
        if audio_groups:
            surviving = {p: [o.key for o in groups[p][1]] for p in surviving_staging}
            _collect_audio(store, report, refs, audio_groups, surviving, clock)
    return report


def _collect_data(store: ObjectStore, report: GcReport, refs: _References, referenced: set[str], prefix: str,
                  objs: list[ObjectInfo], surviving_staging: set[str], clock: float) -> None:
    """One run's data objects: the unreferenced, old ones go once the run's staging no longer claims them."""
    dataset, run_id = report.dataset, prefix.rstrip("/").rsplit("/", 1)[1]
    staging = staging_prefix(dataset, run_id) + "/"
    live = [o for o in objs if o.key not in referenced]
    report.referenced_objects += len(objs) - len(live)
    if not live:
        return
    old = [o for o in live if clock - o.mtime > report.older_than_s]
    newest = max(o.mtime for o in live)
    if staging in surviving_staging or not old:  # a resumable run's markers name them, or too young
        report.kept_young.append(_entry(prefix, "data", live, newest, clock))
        return
    if not report.dry_run:
        # Re-check right before deleting: a commit or a resumed run since the scan keeps them.
        referenced = refs.refresh()
        if _live_lease(store, staging, clock) or any(True for _ in store.list(staging)):
            report.kept_young.append(_entry(prefix, "data", live, newest, clock))
            return
        old = [o for o in old if o.key not in referenced]
        for obj in old:
            store.delete(obj.key)
    if old:
        entry = _entry(prefix, "data", old, max(o.mtime for o in old), clock)
        report.removed.append(entry)
        log.info("gc data %s (%d unreferenced objects, %d bytes)%s", store.uri(prefix.rstrip("/")), entry.objects,
                 entry.bytes, " [dry run]" if report.dry_run else "")
    young = [o for o in live if o not in old]
    if young:
        report.kept_young.append(_entry(prefix, "data", young, max(o.mtime for o in young), clock))


def _marker_claims(store: ObjectStore, keys: list[str]) -> set[str]:
    """The audio files the completion markers among `keys` name (`shard.audio.path`)."""
    claimed: set[str] = set()
    for key in keys:
        if not _MARKER_RE.search(key):
            continue
        payload = read_marker(store, key)
        shard = payload.get("shard") if payload else None
        audio = shard.get("audio") if isinstance(shard, dict) else None
        if isinstance(audio, dict) and isinstance(audio.get("path"), str):
            claimed.add(audio["path"])
    return claimed


def _index_target(store: ObjectStore, key: str) -> str | None:
    """The audio file a clip index names, or None (gone, unreadable: it leads a run nowhere)."""
    try:
        path = json.loads(store.get_bytes(key))["file"]["path"]
    except (NotFound, ValueError, KeyError, TypeError):
        return None
    return path if isinstance(path, str) else None


def _audio_claims(store: ObjectStore, staging: dict[str, list[str]], clock: float) -> tuple[set[str], bool]:
    """What the runs staged under `staging` (prefix → its keys) claim: the audio files their markers
    name, and whether any of them holds a live lease (it may be using a clip index right now)."""
    claimed = _marker_claims(store, [k for keys in staging.values() for k in keys])
    leased = any(_live_lease(store, prefix, clock) for prefix, keys in staging.items() if prefix + LEASE in keys)
    return claimed, leased


def _collect_audio(store: ObjectStore, report: GcReport, refs: _References, groups: list[tuple[str, list[ObjectInfo]]],
                   surviving: dict[str, list[str]], clock: float) -> None:
    """Audio files nothing references and their clip indexes: old ones go (see the module doc)."""
    old = report.older_than_s

    def plan(claimed: set[str], leased: bool) -> dict[str, tuple[list[ObjectInfo], list[ObjectInfo]]]:
        """prefix → (objects to remove, objects kept though nothing references them)."""
        out: dict[str, tuple[list[ObjectInfo], list[ObjectInfo]]] = {}
        for prefix, objs in groups:
            files = [o for o in objs if o.key.endswith(".parquet")]
            index = next((o for o in objs if o.key.endswith(".json")), None)
            young_index = index is not None and clock - index.mtime <= old
            keep = {o.key for o in files if clock - o.mtime <= old or o.key in claimed}
            # The index is read only when what it names decides something (a young one always stays).
            asks = index is not None and (not young_index or len(keep) < len(files))
            target = _index_target(store, index.key) if asks and index is not None else None
            keep |= {o.key for o in files if o.key == target and (young_index or leased)}
            doomed = [o for o in files if o.key not in keep]
            if index is not None and target not in keep and not young_index:
                doomed.insert(0, index)  # first: no run finds a file through an index while it goes
            referenced = {o.key for o in files if o.key in claimed}
            unclaimed = [o for o in objs if o not in doomed and o.key not in referenced
                         and not (o is index and target in referenced)]
            out[prefix] = (doomed, unclaimed)
        return out

    claimed, leased = _audio_claims(store, surviving, clock)
    claimed |= refs.audio
    planned = plan(claimed, leased)
    report.referenced_audio = sum(1 for _, objs in groups for o in objs if o.key in claimed)
    if not report.dry_run and any(doomed for doomed, _ in planned.values()):
        # Re-check right before deleting: a commit, a marker or a lease since the scan keeps them.
        refs.refresh()
        staged: dict[str, list[str]] = {}
        for key in store.list(f"{report.dataset}/{STAGING_DIR}/"):
            prefix = staging_run(report.dataset, key)
            if prefix is not None:
                staged.setdefault(prefix, []).append(key)
        again, leased_now = _audio_claims(store, staged, clock)
        planned = plan(claimed | again | refs.audio, leased or leased_now)
        for doomed, _ in planned.values():
            for obj in doomed:
                store.delete(obj.key)
    for prefix, (doomed, unclaimed) in planned.items():
        if doomed:
            entry = _entry(prefix, "audio", doomed, max(o.mtime for o in doomed), clock)
            report.removed.append(entry)
            log.info("gc audio %s (%d objects, %d bytes)%s", store.uri(prefix), entry.objects, entry.bytes,
                     " [dry run]" if report.dry_run else "")
        if unclaimed:
            report.kept_young.append(_entry(prefix, "audio", unclaimed, max(o.mtime for o in unclaimed), clock))


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
