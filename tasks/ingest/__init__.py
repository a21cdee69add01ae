"""Ingest: corpus sources → clip references (for planning) → Clip records (for processing).

One module per source layout; this package only dispatches on `SourceConfig.kind`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from schemas.config import SourceConfig
from schemas.records import Clip, ReasonCode
from tasks.ingest.common import ClipRef
from tasks.ingest.folder import folder_clip, iter_audio_files, iter_folder_refs
from tasks.ingest.manifest import MANIFEST_SUFFIXES, iter_manifest_refs, read_record_at, record_to_clip


class SourceError(ValueError):
    """A source that cannot be read at all (missing path, unknown layout): fails the run up front."""


def source_kind(source: SourceConfig) -> str:
    path = Path(source.path)
    if "://" in source.path:
        raise SourceError(f"source {source.path}: only local paths are supported as corpus sources for now")
    if not path.exists():
        raise SourceError(f"source {source.path}: no such file or directory; fix sources[].path in the config")
    if source.kind != "auto":
        if source.kind == "folder" and not path.is_dir():
            raise SourceError(f"source {source.path}: kind 'folder' needs a directory")
        if source.kind == "manifest" and not path.is_file():
            raise SourceError(f"source {source.path}: kind 'manifest' needs a file")
        return source.kind
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    raise SourceError(f"source {source.path}: not a folder and not a manifest ({sorted(MANIFEST_SUFFIXES)})")


def dataset_name(source: SourceConfig) -> str:
    if source.dataset:
        return source.dataset
    path = Path(source.path)
    is_manifest = path.suffix.lower() in MANIFEST_SUFFIXES and not path.is_dir()
    # A manifest is usually named manifest.jsonl inside the corpus folder: name it after the folder.
    if is_manifest and path.stem.lower() in {"manifest", "metadata", "index", "train", "data"}:
        return path.parent.name
    return path.stem if is_manifest else path.name


def iter_refs(sources: list[SourceConfig]) -> Iterator[ClipRef]:
    """Every clip reference of every source, lazily."""
    for index, source in enumerate(sources):
        kind = source_kind(source)
        name = dataset_name(source)
        if kind == "folder":
            yield from iter_folder_refs(Path(source.path), index, name)
        else:
            yield from iter_manifest_refs(Path(source.path), index, name)


def source_fingerprint(sources: list[SourceConfig]) -> str:
    """A digest of what the sources hold now: manifest bytes; folder names, sizes and mtimes.

    Part of the run id, so re-running an unchanged corpus resumes its run, while a corpus that
    gained, lost or changed files is a new run (and a new version) instead of "already committed".
    """
    digest = hashlib.sha256()
    for index, source in enumerate(sources):
        digest.update(f"\x1e{index}:{source.path}\x1f".encode())
        path = Path(source.path)
        if source_kind(source) == "folder":
            for rel in iter_audio_files(path):
                st = (path / rel).stat()
                digest.update(f"{rel}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
        else:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def load_clip(ref: ClipRef, sources: list[SourceConfig]) -> Clip:
    """Re-read the record a reference points at; duplicates come back flagged for quarantine."""
    source = sources[ref.source]
    name = dataset_name(source)
    path = Path(source.path)
    if source_kind(source) == "folder":
        clip = folder_clip(path, ref.locator, clip_id=ref.id, dataset=name, language=source.language,
                           extra_labels=source.labels)
    else:
        offset = int(ref.locator)
        record = read_record_at(path, offset)
        clip = record_to_clip(record, clip_id=ref.id, dataset=name, base=path.parent, language=source.language,
                              extra_labels=source.labels, where=f"{path} at byte {offset}")
    if ref.duplicate and clip.ingest_error is None:
        msg = f"{clip.audio_uri}: id {ref.id!r} appears more than once in the sources; give each clip a unique id"
        clip = clip.model_copy(update={"ingest_error": (ReasonCode.duplicate_id, msg)})
    return clip


__all__ = ["ClipRef", "SourceError", "dataset_name", "iter_refs", "load_clip", "source_fingerprint", "source_kind"]
