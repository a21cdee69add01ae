"""Download one committed version to a local directory: resumable and checksum-verified.

DEST is a self-contained copy, a loadable dataset directory (`datasets.load_dataset(DEST)` reads
the card's `configs`, also on the Hub after an upload):
```
DEST/README.md  DEST/data/train-00000-of-00012.parquet  DEST/quarantine/part-00000.parquet  DEST/manifest.json
```
A version of manifest layout 1 is mirrored as stored. One of layout 2 (shards referenced at their
data keys, outside the version prefix) is materialised in the same local names: DEST/manifest.json
then lists those local paths (layout 1; rows, bytes and sha256 unchanged) and DEST/README.md is the
card rendered from it. A file already present with the manifest's size and sha256 is skipped; anything else streams into
`<file>.part` (hashed on the way) and is renamed into place only if it verifies. A mismatch means
the store's copy is corrupt: the pull stops with an error naming the shard. `manifest.json` is
written last, so a DEST with a manifest is a complete pull.

Audio stored once (a shard whose ShardInfo names an audio file, its own `audio.bytes` null): DEST
gets the shard joined with its audio (storage/materialize.py), so every reader of DEST sees the
bytes. Both inputs are downloaded whole and verified against the manifest first (a mismatch stops
the pull naming the file); the local manifest lists the joined file with its own rows, bytes and
sha256 and no audio file. `DEST/data/.materialized/<file>.json` records which inputs a joined file
came from, so a rerun keeps one that still matches (resumable as plain shards are).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel, Field

from schemas.manifest import Manifest
from storage.card import render_card, stored_bytes
from storage.materialize import Materializer, fetch_verified, local_ok, needs_materializing
from storage.objectstore import NotFound, ObjectStore
from storage.versions import (
    CARD_PATH,
    LAYOUT_IN_VERSION,
    MANIFEST_PATH,
    VersionNotFound,
    card_key,
    data_path,
    file_key,
    manifest_key,
    quarantine_path,
)

log = logging.getLogger(__name__)


class PullError(RuntimeError):
    """A stored file does not match its manifest entry (the message names it)."""


class PullReport(BaseModel):
    dataset: str
    version: str
    dest: str
    downloaded: list[str] = Field(default_factory=list)  # paths relative to dest
    skipped: list[str] = Field(default_factory=list)  # already present and verified
    bytes_downloaded: int = 0
    bytes_total: int = 0  # shard + quarantine bytes of the version, and its audio files' (each once)
    card_generated: bool = False  # the version predates cards: README.md rendered from the manifest


def _write_small(path: Path, data: bytes) -> bool:
    """Write a small file atomically unless identical content is already there; True if written."""
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)
    return True


def local_manifest(manifest: Manifest) -> Manifest:
    """The manifest of a self-contained copy: layout 1 paths (data/train-…-of-…, quarantine/part-…);
    the manifest itself if it already is one."""
    if manifest.layout == LAYOUT_IN_VERSION:
        return manifest
    n = len(manifest.shards)
    return manifest.model_copy(update={
        "layout": LAYOUT_IN_VERSION,
        "shards": [s.model_copy(update={"path": data_path(i, n)}) for i, s in enumerate(manifest.shards)],
        "quarantine": [q.model_copy(update={"path": quarantine_path(i)}) for i, q in enumerate(manifest.quarantine)],
    })


def _write_card(store: ObjectStore, manifest: Manifest, local: Manifest, dest: Path, report: PullReport) -> None:
    """DEST/README.md: the stored card, or one rendered from `local` when the copy's paths or
    checksums differ from the store's (layout 2, joined shards) or the version predates cards."""
    if local is not manifest:
        card = render_card(local).encode()
    else:
        try:
            card = store.get_bytes(card_key(manifest.lineage.dataset, manifest.lineage.version))
        except NotFound:
            card = render_card(manifest).encode()
            report.card_generated = True
    (report.downloaded if _write_small(dest / CARD_PATH, card) else report.skipped).append(CARD_PATH)


def pull_version(store: ObjectStore, dataset: str, version: str, dest: Path, progress: bool = False) -> PullReport:
    """Download a committed version (manifest, card, shards, quarantine parts) into `dest`; shards
    whose audio is in audio files are written joined (storage/materialize.py)."""
    dest = Path(dest)
    try:
        manifest_bytes = store.get_bytes(manifest_key(dataset, version))
    except NotFound:
        raise VersionNotFound(f"dataset {dataset!r} has no committed version {version!r}") from None
    manifest = Manifest.model_validate_json(manifest_bytes)
    local = local_manifest(manifest)
    n_shards = len(manifest.shards)
    files = list(zip([*manifest.shards, *manifest.quarantine], [*local.shards, *local.quarantine], strict=True))
    total = stored_bytes(manifest) + sum(q.bytes for q in manifest.quarantine)
    report = PullReport(dataset=dataset, version=version, dest=str(dest), bytes_total=total)
    dest.mkdir(parents=True, exist_ok=True)

    joined_shards = needs_materializing(manifest)
    if not joined_shards:  # the card as before, first; a joined copy's card needs its checksums (last)
        _write_card(store, manifest, local, dest, report)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=report.bytes_total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"{dataset}@{version}", dynamic_ncols=True)
    shards = list(local.shards)
    try:
        with Materializer(store, manifest, dest, bar=bar, error=PullError) as joined:
            for n, (info, here) in enumerate(files):
                target = dest.joinpath(*here.path.split("/"))
                if n < n_shards and info.audio is not None:  # audio stored once: the local copy holds it
                    got = joined.get(info, target)
                    shards[n] = got.info.model_copy(update={"path": here.path})
                    (report.downloaded if got.written else report.skipped).append(here.path)
                    continue
                if local_ok(target, info.bytes, info.sha256):
                    report.skipped.append(here.path)
                    if bar is not None:
                        bar.update(info.bytes)
                    continue
                fetch_verified(store, file_key(manifest, info), target, info, bar=bar, error=PullError)
                report.downloaded.append(here.path)
                report.bytes_downloaded += info.bytes
            report.bytes_downloaded += joined.bytes_downloaded
    finally:
        if bar is not None:
            bar.close()

    if joined_shards:  # joined shards: their own size and checksum, no audio file
        local = local.model_copy(update={"shards": shards})
        _write_card(store, manifest, local, dest, report)
    manifest_bytes = manifest_bytes if local is manifest else local.model_dump_json(indent=2).encode()
    # Last: a local manifest means every file above is present and verified.
    (report.downloaded if _write_small(dest / MANIFEST_PATH, manifest_bytes) else report.skipped).append(
        MANIFEST_PATH)
    log.info("pulled %s %s to %s: %d downloaded, %d already there", dataset, version, dest,
             len(report.downloaded), len(report.skipped))
    return report
