"""Ingest: corpus sources → clip references (for planning) → Clip records (for processing).

One module per source layout; this package only dispatches on `SourceConfig.kind`:
`manifest` and `folder` (and `auto`, which picks between them and also recognises a gzipped lhotse
manifest), `lhotse`, `hf_parquet`, and the named corpora `librispeech`, `libritts` (LibriTTS and
LibriTTS-R), `vctk`, `commonvoice`, `cremad`, `esd`. Each adapter yields light `ClipRef`s in a sorted
walk and re-loads one clip from its locator, reading audio only below the source's `Roots` (its
root plus `sources[N].allowed_roots`). A ref for a folder a walk could not enter carries its
reason in the locator and loads as a quarantined clip.

Remote sources (`s3://` for every kind, `http(s)://` for manifests) are listed and read through
storage/sources.py with the run's `s3` block merged with `sources[N].s3`; each remote root (and the
folder above it, where LibriSpeech keeps SPEAKERS.TXT) is registered there, so the audio stage reads
a clip with its source's settings. The named layouts and lhotse get an s3:// root as a `RemotePath`
(tasks/ingest/remote.py): one code path per adapter for local and remote corpora.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from schemas.config import SourceConfig
from schemas.records import Clip, ReasonCode
from storage import sources as stores
from tasks.ingest import commonvoice, emotion, hf_parquet, lhotse, librispeech, vctk
from tasks.ingest.common import ClipRef, CorpusPath, SourceError, ref_problem
from tasks.ingest.folder import (
    folder_clip,
    is_audio_name,
    iter_folder_refs,
    iter_remote_folder_refs,
    remote_folder_clip,
    remote_listing,
)
from tasks.ingest.manifest import (
    MANIFEST_SUFFIXES,
    iter_manifest_refs,
    read_record_at,
    record_to_clip,
    row_locator,
)
from tasks.ingest.paths import Roots, stat_key, walk
from tasks.ingest.remote import RemotePath, forget


@dataclass(frozen=True)
class Adapter:
    """One source layout: its refs (planning), its clip loader (shards) and what its path must be."""

    iter_refs: Callable[..., Iterator[ClipRef]]  # (root, source index, dataset, *, roots) -> refs
    load: Callable[..., Clip]  # (root, locator, *, clip_id, dataset, language, extra_labels, roots) -> Clip
    needs: str  # "dir", "file" or "any"
    files: Callable[[CorpusPath], list[CorpusPath]] | None = None  # what the fingerprint stats; None: all below
    # Planning by audio time (tasks/plan.py): (root, locators) -> (locator, audio file) of each, read
    # without opening audio; or (root) -> (locator, seconds) stated by the manifest. None: by count.
    audio: Callable[[CorpusPath, list[str]], Iterator[tuple[str, CorpusPath]]] | None = None
    seconds: Callable[[CorpusPath], Iterator[tuple[str, float]]] | None = None


def relative_audio(root: CorpusPath, locators: list[str]) -> Iterator[tuple[str, CorpusPath]]:
    """The layouts whose locator is the audio file's path below the corpus root."""
    return ((loc, root / loc) for loc in locators if ref_problem(loc) is None)


ADAPTERS: dict[str, Adapter] = {
    "lhotse": Adapter(lhotse.iter_lhotse_refs, lhotse.load_lhotse_clip, "any", lhotse.manifest_files,
                      seconds=lhotse.clip_seconds),
    "hf_parquet": Adapter(hf_parquet.iter_hf_parquet_refs, hf_parquet.load_hf_parquet_clip, "any"),
    "librispeech": Adapter(librispeech.iter_librispeech_refs, librispeech.load_librispeech_clip, "dir",
                           audio=relative_audio),
    "libritts": Adapter(librispeech.iter_libritts_refs, librispeech.load_libritts_clip, "dir", audio=relative_audio),
    "vctk": Adapter(vctk.iter_vctk_refs, vctk.load_vctk_clip, "dir", audio=relative_audio),
    "commonvoice": Adapter(commonvoice.iter_commonvoice_refs, commonvoice.load_commonvoice_clip, "any",
                           audio=commonvoice.audio_paths),
    "cremad": Adapter(emotion.iter_cremad_refs, emotion.load_cremad_clip, "dir", audio=relative_audio),
    "esd": Adapter(emotion.iter_esd_refs, emotion.load_esd_clip, "dir", audio=relative_audio),
}


def register_source(source: SourceConfig, index: int | None = None) -> None:
    """Make the source's remote root and remote allowed_roots readable with its S3 settings."""
    setting = f"sources[{index}].s3" if index is not None else "sources[].s3"
    for root in (source.path, *source.allowed_roots):
        if stores.is_remote(root):
            store = stores.source_store(root, source.run_s3, source.s3, setting)
            folder = stores.parent(root) if "." in root.rstrip("/").rsplit("/", 1)[-1] else root
            stores.register(folder, store)
            if root == source.path and source.kind in ADAPTERS and folder.count("/") > 2:  # s3://bucket/a/b
                stores.register(stores.parent(folder), store)  # corpus metadata one level up (SPEAKERS.TXT)


FILE_KINDS = ("lhotse", "commonvoice", "hf_parquet")  # a source of these kinds may be one file (a manifest, a TSV)
_REMOTE_KINDS: dict[tuple[str, str], str] = {}  # (path, kind) → kind, once a source was found


def _remote_kind(source: SourceConfig) -> str:
    """The layout of an s3:// or http(s):// source, checked once per process (a stat or a listing)."""
    found = _REMOTE_KINDS.get((source.path, source.kind))
    if found is not None:
        return found
    uri, kind = source.path, source.kind
    suffix = Path(uri).suffix.lower()
    if kind == "auto":
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        gz_lhotse = name.lower().endswith(".jsonl.gz") and lhotse.manifest_kind(name) is not None
        kind = "lhotse" if gz_lhotse else "manifest" if suffix in MANIFEST_SUFFIXES else "folder"
    if uri.partition("://")[0].lower() in ("http", "https") and kind != "manifest":
        raise SourceError(f"source {uri}: an http(s):// source must be a manifest ({sorted(MANIFEST_SUFFIXES)}) "
                          "listing its audio; folders and corpus layouts need s3:// or a local path")
    try:
        if kind == "manifest" or (kind in FILE_KINDS and "." in uri.rsplit("/", 1)[-1]):
            stores.stat(uri)
        elif not (stores.has_objects(uri) if kind in ADAPTERS else remote_listing(uri)):
            raise SourceError(f"source {uri}: nothing below this prefix; fix sources[].path (s3://bucket/prefix)")
    except stores.SourceReadError as exc:
        raise SourceError(f"source {uri}: {exc}") from None
    _REMOTE_KINDS[(source.path, source.kind)] = kind
    return kind


def source_kind(source: SourceConfig, index: int | None = None) -> str:
    """The source's layout (`index` names it in messages); a remote source is registered and checked."""
    path = Path(source.path)
    if "://" in source.path:
        if stores.is_remote(source.path):
            register_source(source, index)
            return _remote_kind(source)
        raise SourceError(f"source {source.path}: only local paths, s3:// and http(s):// URIs are corpus sources")
    if "\0" in source.path or not path.exists():
        raise SourceError(f"source {source.path!r}: no such file or directory; fix sources[].path in the config")
    if not path.is_dir() and not path.is_file():  # never open a FIFO or device as a manifest
        raise SourceError(f"source {source.path}: not a regular file or folder (a FIFO or device?); "
                          "fix sources[].path in the config")
    if source.kind != "auto":
        if source.kind == "folder" and not path.is_dir():
            raise SourceError(f"source {source.path}: kind 'folder' needs a directory")
        if source.kind == "manifest" and not path.is_file():
            raise SourceError(f"source {source.path}: kind 'manifest' needs a file")
        adapter = ADAPTERS.get(source.kind)
        if adapter is not None and adapter.needs == "dir" and not path.is_dir():
            raise SourceError(f"source {source.path}: kind {source.kind!r} needs the corpus folder, not a file")
        return source.kind
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if lhotse.is_lhotse_manifest(path):
        return "lhotse"
    raise SourceError(f"source {source.path}: not a folder and not a manifest ({sorted(MANIFEST_SUFFIXES)}); "
                      f"set sources[].kind for corpus layouts ({', '.join(ADAPTERS)})")


def dataset_name(source: SourceConfig) -> str:
    if source.dataset:
        return source.dataset
    path = Path(source.path)
    if lhotse.manifest_kind(path.name) and path.name.lower().endswith(".gz"):
        return lhotse.manifest_stem(path.name)  # cuts_train.jsonl.gz → cuts_train
    is_manifest = path.suffix.lower() in MANIFEST_SUFFIXES and not path.is_dir()
    # A manifest is usually named manifest.jsonl inside the corpus folder: name it after the folder.
    if is_manifest and path.stem.lower() in {"manifest", "metadata", "index", "train", "data"}:
        return path.parent.name
    return path.stem if is_manifest else path.name


def source_roots(source: SourceConfig, index: int | None = None) -> Roots:
    """Where a source may read: its own root (a manifest's folder, the corpus folder, an s3://
    prefix) plus `allowed_roots`; `index` names `sources[index]` in messages."""
    return Roots.of(source.path, source.allowed_roots, index)


def iter_refs(sources: list[SourceConfig]) -> Iterator[ClipRef]:
    """Every clip reference of every source, lazily."""
    for index, source in enumerate(sources):
        kind = source_kind(source, index)
        name = dataset_name(source)
        roots = source_roots(source, index)
        remote = stores.is_remote(source.path)
        if kind == "folder":
            yield from (iter_remote_folder_refs(source.path, index, name) if remote
                        else iter_folder_refs(Path(source.path), index, name, roots))
        elif kind == "manifest":
            yield from iter_manifest_refs(source.path if remote else Path(source.path), index, name)
        else:
            if remote:
                forget(source.path)  # planning looks at the corpus as it is now
            yield from ADAPTERS[kind].iter_refs(_root(source), index, name, roots=roots)


def _root(source: SourceConfig) -> CorpusPath:
    """The adapter's root: a `RemotePath` for an s3:// corpus; for hf_parquet a URI stays a string
    (Path would fold its `//`)."""
    if "://" not in source.path:
        return Path(source.path)
    return cast(Path, source.path) if source.kind == "hf_parquet" else RemotePath(source.path)


def source_fingerprint(sources: list[SourceConfig]) -> str:
    """A digest of what the sources hold now: manifest bytes; folder (and corpus) names, sizes and mtimes.

    Part of the run id, so re-running an unchanged corpus resumes its run, while a corpus that
    gained, lost or changed files is a new run (and a new version) instead of "already committed".
    """
    digest = hashlib.sha256()
    for index, source in enumerate(sources):
        digest.update(f"\x1e{index}:{source.path}\x1f".encode())
        path = Path(source.path)
        kind = source_kind(source, index)
        if stores.is_remote(source.path) and kind in ADAPTERS and kind != "hf_parquet":
            forget(source.path)
            _stat_digest(digest, RemotePath(source.path), ADAPTERS[kind], source_roots(source, index))
        elif stores.is_remote(source.path) and kind != "hf_parquet":
            _remote_digest(digest, source.path, kind)
        elif kind == "folder":
            _walk_digest(digest, path, is_audio_name, source_roots(source, index))
        elif kind == "manifest":
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        elif kind == "hf_parquet":
            for ref in hf_parquet.parquet_files(source.path):
                digest.update(f"{ref.rel}\x1f{ref.size}\x1f{ref.mtime_ns}\n".encode())
        else:
            _stat_digest(digest, path, ADAPTERS[kind], source_roots(source, index))
    return digest.hexdigest()[:16]


def _remote_digest(digest: hashlib._Hash, uri: str, kind: str) -> None:
    """A remote manifest's size and ETag; a remote folder's keys, sizes and ETags (one listing)."""
    try:
        entries = [stores.stat(uri)] if kind == "manifest" else remote_listing(uri)
    except stores.SourceReadError as exc:
        raise SourceError(f"source {uri}: {exc}") from None
    for entry in entries:
        digest.update(f"{entry.rel}\x1f{entry.size}\x1f{entry.version}\n".encode())


def _walk_digest(digest: hashlib._Hash, path: CorpusPath, match: Callable[[str], bool], roots: Roots) -> None:
    """Names, sizes and mtimes of the files a walk finds (stat only: FIFOs and devices are never
    opened, a dangling link does not fail the run), and the folders it could not enter."""
    for item in walk(path, match, roots):
        if isinstance(item, str):
            digest.update(f"{item}\x1f{stat_key(path / item)}\n".encode("utf-8", "surrogateescape"))
        else:
            digest.update(f"{item.rel}/\x1f{item.reason.value}\n".encode("utf-8", "surrogateescape"))


def _stat_digest(digest: hashlib._Hash, path: CorpusPath, adapter: Adapter, roots: Roots) -> None:
    """Names, sizes and mtimes (s3://: ETags, from one listing) of every file a corpus source reads
    (audio and metadata alike)."""
    if adapter.files is not None:
        files = [(p.name, p) for p in adapter.files(path)]
    elif isinstance(path, RemotePath) and path.is_dir():
        _remote_digest(digest, str(path), "folder")  # one listing: keys, sizes, ETags
        return
    elif path.is_dir():
        _walk_digest(digest, path, lambda _: True, roots)
        return
    else:
        files = [(path.name, path)]
    for rel, file in files:
        digest.update(f"{rel}\x1f{stat_key(file)}\n".encode("utf-8", "surrogateescape"))


def load_clip(ref: ClipRef, sources: list[SourceConfig]) -> Clip:
    """Re-read the record a reference points at; duplicates come back flagged for quarantine."""
    source = sources[ref.source]
    name = dataset_name(source)
    path = Path(source.path)
    problem = ref_problem(ref.locator)
    if problem is not None:  # a folder the walk could not enter
        reason, rel, message = problem
        return Clip(id=ref.id, dataset=name, audio_uri=str(path / rel), ingest_error=(reason, message))
    kind = source_kind(source, ref.source)
    roots = source_roots(source, ref.source)
    remote = stores.is_remote(source.path)
    if kind == "folder" and remote:
        clip = remote_folder_clip(source.path, ref.locator, clip_id=ref.id, dataset=name, language=source.language,
                                  extra_labels=source.labels, roots=roots)
    elif kind == "folder":
        clip = folder_clip(path, ref.locator, clip_id=ref.id, dataset=name, language=source.language,
                           extra_labels=source.labels, roots=roots)
    elif kind in ADAPTERS:
        clip = ADAPTERS[kind].load(_root(source), ref.locator, clip_id=ref.id, dataset=name,
                                   language=source.language, extra_labels=source.labels, roots=roots)
    else:
        offset = int(ref.locator)
        manifest: Path | str = source.path if remote else path
        record = read_record_at(manifest, offset)
        base = stores.parent(source.path) if remote else path.parent
        clip = record_to_clip(record, clip_id=ref.id, dataset=name, base=base, language=source.language,
                              extra_labels=source.labels, where=f"{manifest} at byte {offset}", roots=roots,
                              locate=row_locator(manifest, offset))
    if ref.duplicate and clip.ingest_error is None:
        msg = f"{clip.audio_uri}: id {ref.id!r} appears more than once in the sources; give each clip a unique id"
        clip = clip.model_copy(update={"ingest_error": (ReasonCode.duplicate_id, msg)})
    return with_source_settings(clip, source)


def with_source_settings(clip: Clip, source: SourceConfig) -> Clip:
    """The source's settings that travel with each clip: `speech: false` (sound/music: labels-only
    seed, never `no_speech`), `seed_labels` (when set, replacing the adapter's default), and with
    `multi_speaker: quarantine` a clip whose spans name several speakers is quarantined."""
    update: dict[str, object] = {}
    if not source.speech:
        update["speech"] = False
    if source.seed_labels is not None:
        update["seed_labels"] = list(source.seed_labels)
    speakers = sorted({s.speaker for s in clip.spans if s.speaker})
    if source.multi_speaker == "quarantine" and len(speakers) > 1 and clip.ingest_error is None:
        message = (f"{clip.audio_uri}: {len(speakers)} speakers in one clip ({', '.join(speakers[:5])}); set "
                   "sources[].multi_speaker: spans to describe each, or cut per supervision (trim_to_supervisions)")
        update["ingest_error"] = (ReasonCode.multi_speaker, message)
    return clip.model_copy(update=update) if update else clip


__all__ = ["ADAPTERS", "Adapter", "ClipRef", "Roots", "SourceError", "dataset_name", "iter_refs", "load_clip",
           "source_fingerprint", "source_kind", "source_roots"]
