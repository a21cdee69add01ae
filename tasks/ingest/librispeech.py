"""LibriSpeech and LibriTTS / LibriTTS-R folder layouts (`prepare_librispeech`, `prepare_libritts`).

LibriSpeech: `<split>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`, one `<spk>-<chapter>.trans.txt`
per chapter ("UTT-ID TEXT" lines) and `SPEAKERS.TXT` ("ID | SEX | SUBSET | MINUTES | NAME") at the
top of `LibriSpeech/`.
LibriTTS(-R): `<split>/<spk>/<chapter>/<spk>_<chapter>_<para>_<sent>.wav` with per-utterance
`.normalized.txt` (the transcript) and `.original.txt`, a `<spk>_<chapter>.trans.tsv` per chapter,
and `speakers.tsv` or `SPEAKERS.txt` at the top of `LibriTTS/`.

The source path is either the corpus folder (holding the split folders) or one split folder, local
or `s3://` (one listing; see tasks/ingest/remote.py); the speakers file is looked up there and one
level up. Clip ids are the corpus's utterance ids
(unique across splits); the locator is the audio path relative to the source folder. No seed
labels by default: gender is a canonical attribute, chapter and subset are bookkeeping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from schemas.records import Clip, ReasonCode
from tasks.ingest.common import ClipRef, CorpusPath, SourceError, label_dict, make_id, one_line, path_of
from tasks.ingest.files import FileKey, metadata_key, read_text
from tasks.ingest.paths import Rejected, Roots, WalkProblem, prepare, walk

LIBRISPEECH_AUDIO = re.compile(r"^(\d+)-(\d+)-(\d+)\.flac$", re.IGNORECASE)
LIBRITTS_AUDIO = re.compile(r"^(\d+)_(\d+)_([0-9A-Za-z]+_[0-9A-Za-z]+)\.wav$", re.IGNORECASE)
SPEAKER_FILES = {
    "librispeech": ("SPEAKERS.TXT", "SPEAKERS.txt"),
    "libritts": ("speakers.tsv", "SPEAKERS.txt", "SPEAKERS.TXT"),
}


def _speakers_path(root: CorpusPath, corpus: str) -> CorpusPath:
    names = SPEAKER_FILES[corpus]
    for folder in (root, root.parent):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    title = "LibriSpeech" if corpus == "librispeech" else "LibriTTS"
    raise SourceError(
        f"{root / names[0]}: missing speaker list (looked for {' or '.join(names)} in {root} and {root.parent}); "
        f"{title} ships it at the top of its corpus folder, next to the split folders: extract it from the "
        f"corpus tarball and point sources[].path at the corpus or split folder (or use kind: folder to "
        f"ingest the audio without speaker labels)")


@lru_cache(maxsize=8)
def _speakers(key: FileKey) -> dict[str, dict[str, str]]:
    """Speaker id → {gender, subset}, from SPEAKERS.TXT (pipe separated) or speakers.tsv (tab, header)."""
    path = path_of(key[0])
    text = read_text(path)
    out: dict[str, dict[str, str]] = {}
    if path.suffix.lower() == ".tsv":
        lines = [line.split("\t") for line in text.splitlines() if line.strip()]
        header = [h.strip().lower() for h in lines[0]] if lines else []
        known = bool({"reader", "id", "speaker"} & set(header))
        cols = {name: i for i, name in enumerate(header)} if known else {}
        i_id = next((cols[c] for c in ("reader", "id", "speaker") if c in cols), 0)
        i_gender = next((cols[c] for c in ("gender", "sex") if c in cols), 1)
        i_subset = cols.get("subset", 2)
        for fields in lines[1:] if known else lines:
            fields = [f.strip() for f in fields]
            if len(fields) > max(i_id, i_gender):
                out[fields[i_id]] = {"gender": fields[i_gender],
                                     "subset": fields[i_subset] if len(fields) > i_subset else ""}
        return out
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        fields = [f.strip() for f in line.split("|")]
        if len(fields) >= 2:
            out[fields[0]] = {"gender": fields[1], "subset": fields[2] if len(fields) > 2 else ""}
    return out


def _speaker_labels(root: CorpusPath, corpus: str, speaker: str) -> dict[str, str]:
    path = _speakers_path(root, corpus)
    return _speakers(metadata_key(path, "speaker list", "restore it from the corpus tarball")).get(speaker, {})


def _trans_txt_name(speaker: str, chapter: str) -> str:
    return f"{speaker}-{chapter}.trans.txt"


@lru_cache(maxsize=64)
def _chapter_transcripts(key: FileKey) -> dict[str, str]:
    """LibriSpeech `<spk>-<chapter>.trans.txt`: utterance id → text."""
    out: dict[str, str] = {}
    for line in read_text(path_of(key[0])).splitlines():
        utt, _, text = line.strip().partition(" ")
        if utt:
            out[utt] = text.strip()
    return out


@lru_cache(maxsize=64)
def _chapter_tsv(key: FileKey) -> dict[str, tuple[str, str]]:
    """LibriTTS `<spk>_<chapter>.trans.tsv`: utterance id → (original, normalized)."""
    out: dict[str, tuple[str, str]] = {}
    for line in read_text(path_of(key[0])).splitlines():
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) >= 3:
            out[fields[0]] = (fields[1], fields[2])
    return out


def _layout_error(root: CorpusPath, corpus: str) -> SourceError:
    if corpus == "librispeech":
        return SourceError(f"{root}: no LibriSpeech utterances (<spk>/<chapter>/<spk>-<chapter>-<utt>.flac) found; "
                           "point sources[].path at LibriSpeech/ or one split folder (for LibriTTS use kind: libritts)")
    return SourceError(f"{root}: no LibriTTS utterances (<spk>/<chapter>/<spk>_<chapter>_<para>_<sent>.wav) found; "
                       "point sources[].path at LibriTTS/ (or LibriTTS_R/) or one split folder "
                       "(for LibriSpeech use kind: librispeech)")


def iter_libri_refs(root: CorpusPath, source_index: int, dataset: str, corpus: str,
                    roots: Roots | None = None) -> Iterator[ClipRef]:
    """Every utterance below `root` in sorted order; LibriSpeech chapters must have their transcript file.
    A folder the walk cannot enter is a quarantine ref (see `paths.walk`)."""
    pattern = LIBRISPEECH_AUDIO if corpus == "librispeech" else LIBRITTS_AUDIO
    checked: set[str] = set()
    count = 0
    for rel in walk(root, lambda name: pattern.match(name) is not None, roots):
        if isinstance(rel, WalkProblem):
            yield rel.ref(dataset, source_index)
            continue
        folder, _, name = rel.rpartition("/")
        m = pattern.match(name)
        assert m is not None
        if count == 0:
            _speakers_path(root, corpus)  # fail up front (at planning), not in the middle of a shard
        if corpus == "librispeech" and folder not in checked:
            trans = root / folder / _trans_txt_name(m.group(1), m.group(2))
            metadata_key(trans, "chapter transcript file",
                         "re-extract this chapter from the LibriSpeech tarball, or use kind: folder")
            checked.add(folder)
        count += 1
        yield ClipRef(id=make_id(dataset, name.rsplit('.', 1)[0]), source=source_index, locator=rel)
    if count == 0:
        raise _layout_error(root, corpus)


def iter_librispeech_refs(root: CorpusPath, source_index: int, dataset: str, *,
                          roots: Roots | None = None) -> Iterator[ClipRef]:
    return iter_libri_refs(root, source_index, dataset, "librispeech", roots)


def iter_libritts_refs(root: CorpusPath, source_index: int, dataset: str, *,
                       roots: Roots | None = None) -> Iterator[ClipRef]:
    return iter_libri_refs(root, source_index, dataset, "libritts", roots)


def _split_of(rel: str) -> str | None:
    """The split folder name (`train-clean-100`, ...) when the source is the corpus folder."""
    parts = rel.split("/")
    return parts[0] if len(parts) >= 4 else None


def load_librispeech_clip(root: CorpusPath, locator: str, *, clip_id: str, dataset: str, language: str | None,
                          extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    audio = root / locator
    real = (roots or Roots.of(root)).check(str(audio))
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, str(audio))
    utt = audio.name.rsplit(".", 1)[0]
    speaker, chapter, _ = utt.split("-", 2)
    trans = audio.parent / _trans_txt_name(speaker, chapter)
    text = _chapter_transcripts(metadata_key(trans, "chapter transcript file",
                                             "re-extract this chapter from the LibriSpeech tarball")).get(utt)
    spk = _speaker_labels(root, "librispeech", speaker)
    labels = label_dict(extra_labels, [("speaker", speaker), ("chapter", chapter), ("gender", spk.get("gender")),
                                       ("subset", _split_of(locator) or spk.get("subset"))])
    return Clip(id=clip_id, dataset=dataset, audio_uri=real, transcript=one_line(text),
                language=language or "en", labels=labels)


def _read_optional(path: CorpusPath) -> str | None:
    try:
        return read_text(path)
    except FileNotFoundError:
        return None


def load_libritts_clip(root: CorpusPath, locator: str, *, clip_id: str, dataset: str, language: str | None,
                       extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    audio = root / locator
    real = (roots or Roots.of(root)).check(str(audio))
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, str(audio))
    utt = audio.name.rsplit(".", 1)[0]
    speaker, chapter, _ = utt.split("_", 2)
    try:
        normalized = _read_optional(audio.with_name(f"{utt}.normalized.txt"))
        original = _read_optional(audio.with_name(f"{utt}.original.txt"))
    except SourceError as exc:  # a FIFO or device in a transcript's place
        return Clip(id=clip_id, dataset=dataset, audio_uri=real, ingest_error=(ReasonCode.not_a_file, str(exc)))
    if normalized is None:
        tsv = audio.with_name(f"{speaker}_{chapter}.trans.tsv")
        if tsv.is_file():
            row = _chapter_tsv(metadata_key(tsv, "chapter transcript file", "re-extract the chapter")).get(utt)
            if row is not None:
                original = original if original is not None else row[0]
                normalized = row[1]
    spk = _speaker_labels(root, "libritts", speaker)
    labels = label_dict(extra_labels, [("speaker", speaker), ("chapter", chapter), ("gender", spk.get("gender")),
                                       ("subset", _split_of(locator) or spk.get("subset")),
                                       ("original_text", one_line(original))])
    return Clip(id=clip_id, dataset=dataset, audio_uri=real,
                transcript=one_line(normalized if normalized is not None else original),
                language=language or "en", labels=labels)


def prepare_librispeech(path: str | Path, dataset: str = "librispeech", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_librispeech_refs, load_librispeech_clip, Path(path), dataset, allowed_roots)


def prepare_libritts(path: str | Path, dataset: str = "libritts", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_libritts_refs, load_libritts_clip, Path(path), dataset, allowed_roots)
