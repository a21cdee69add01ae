"""Acted-emotion corpora: CREMA-D (`prepare_cremad`) and ESD (`prepare_esd`).

CREMA-D: `AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav` (e.g. 1001_DFA_ANG_XX.wav) and
`VideoDemographics.csv` (ActorID, Age, Sex, Race, Ethnicity) at the top of the corpus. Labels,
verbatim: emotion code (ANG, DIS, FEA, HAP, NEU, SAD), intensity (LO, MD, HI, XX = unspecified),
sentence code, speaker, gender (Sex), age, race, ethnicity. The transcript is the sentence the code
stands for (the corpus's 12 fixed sentences). Seed labels by default: `intensity` as `Intensity`
in the corpus's documented words (LO Low, MD Medium, HI High; XX, unspecified, left out) and
`race` as `Race`, as DeSTA2.5's CREMA-D seeds do (emotion, gender, age are canonical).

ESD (Emotional Speech Dataset): `<spk>/<Emotion>/[<split>/]<spk>_<n>.wav` (speakers 0001-0010
Mandarin, 0011-0020 English) and `<spk>/<spk>.txt` ("<id>\\t<text>\\t<emotion>" lines). Labels:
speaker, emotion (the folder name, verbatim), split (train/evaluation/test when present). No seed
labels by default: emotion is a canonical attribute, split is bookkeeping.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from schemas.attributes import SeedLabel
from schemas.records import Clip
from tasks.ingest.common import ClipRef, CorpusPath, SourceError, label_dict, make_id, one_line, path_of
from tasks.ingest.files import FileKey, folder_names, metadata_key, read_text
from tasks.ingest.paths import Rejected, Roots, WalkProblem, prepare, walk

# ---------------------------------------------------------------- CREMA-D

CREMAD_AUDIO = re.compile(r"^(\d+)_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})\.wav$", re.IGNORECASE)
CREMAD_SENTENCES = {
    "IEO": "It's eleven o'clock.",
    "TIE": "That is exactly what happened.",
    "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.",
    "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.",
    "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.",
    "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.",
    "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes.",
}
CREMAD_DEMOGRAPHICS = "VideoDemographics.csv"
CREMAD_FIX = ("it ships at the top of the CREMA-D repository next to AudioWAV/: restore it from the corpus "
              "(github.com/CheyneyComputerScience/CREMA-D), or use kind: folder to ingest without speaker labels")
CREMAD_COLUMNS = {"sex": "gender", "age": "age", "race": "race", "ethnicity": "ethnicity"}
CREMAD_SEED_LABELS = [
    SeedLabel(label="intensity", display="Intensity", values={"LO": "Low", "MD": "Medium", "HI": "High", "XX": ""}),
    SeedLabel(label="race", display="Race"),
]


@lru_cache(maxsize=4)
def _demographics(key: FileKey) -> dict[str, dict[str, str]]:
    reader = csv.DictReader(io.StringIO(read_text(path_of(key[0]))))
    out: dict[str, dict[str, str]] = {}
    for row in reader:
        norm = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        actor = norm.get("actorid") or norm.get("actor_id") or norm.get("actor")
        if actor:
            out[actor] = {CREMAD_COLUMNS[k]: v for k, v in norm.items() if k in CREMAD_COLUMNS}
    return out


def iter_cremad_refs(root: CorpusPath, source_index: int, dataset: str, *,
                     roots: Roots | None = None) -> Iterator[ClipRef]:
    metadata_key(root / CREMAD_DEMOGRAPHICS, "CREMA-D speaker demographics", CREMAD_FIX)
    audio_dir = root / "AudioWAV"
    if not audio_dir.is_dir():
        raise SourceError(f"{audio_dir}: missing CREMA-D audio folder; point sources[].path at the CREMA-D "
                          "folder holding AudioWAV/ and VideoDemographics.csv")
    try:
        names = folder_names(audio_dir)
    except OSError as exc:
        raise SourceError(f"{audio_dir}: cannot list the CREMA-D audio folder ({exc.strerror}); "
                          "make it readable (chmod a+rx)") from None
    count = 0
    for name in names:
        if CREMAD_AUDIO.match(name):
            count += 1
            yield ClipRef(id=make_id(dataset, name.rsplit('.', 1)[0]), source=source_index,
                          locator=f"AudioWAV/{name}")
    if count == 0:
        raise SourceError(f"{audio_dir}: no CREMA-D clips named <actor>_<sentence>_<emotion>_<level>.wav")


def load_cremad_clip(root: CorpusPath, locator: str, *, clip_id: str, dataset: str, language: str | None,
                     extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    audio = root / locator
    m = CREMAD_AUDIO.match(audio.name)
    if m is None:
        raise SourceError(f"{audio}: not a CREMA-D clip name")
    real = (roots or Roots.of(root)).check(str(audio))
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, str(audio))
    actor, sentence, emotion, level = m.groups()
    people = _demographics(metadata_key(root / CREMAD_DEMOGRAPHICS, "CREMA-D speaker demographics", CREMAD_FIX))
    person = people.get(actor, {})
    labels = label_dict(extra_labels, [("speaker", actor), ("emotion", emotion), ("intensity", level),
                                       ("sentence", sentence), *person.items()])
    return Clip(id=clip_id, dataset=dataset, audio_uri=real,
                transcript=CREMAD_SENTENCES.get(sentence.upper()), language=language or "en", labels=labels,
                seed_labels=CREMAD_SEED_LABELS)


# ---------------------------------------------------------------- ESD

ESD_SPEAKER = re.compile(r"^\d{4}$")
ESD_AUDIO = re.compile(r"^(\d{4})_(\d+)\.wav$", re.IGNORECASE)


def _esd_transcript_fix(speaker: str) -> str:
    return (f"every ESD speaker folder holds its transcripts as {speaker}/{speaker}.txt "
            "('<id>\\t<text>\\t<emotion>' lines): restore it from the corpus archive")


@lru_cache(maxsize=32)
def _esd_transcripts(key: FileKey) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for line in read_text(path_of(key[0])).splitlines():
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) >= 2 and fields[0]:
            out[fields[0]] = (fields[1], fields[2] if len(fields) > 2 else "")
    return out


def iter_esd_refs(root: CorpusPath, source_index: int, dataset: str, *, roots: Roots | None = None) -> Iterator[ClipRef]:
    speakers = [name for name in folder_names(root) if ESD_SPEAKER.match(name) and (root / name).is_dir()]
    if not speakers:
        raise SourceError(f"{root}: no ESD speaker folders (0001/ ... 0020/); point sources[].path at the folder "
                          "holding them (`Emotion Speech Dataset/`)")
    roots = roots or Roots.of(root)
    for speaker in speakers:
        metadata_key(root / speaker / f"{speaker}.txt", "ESD transcript file", _esd_transcript_fix(speaker))
        for rel in walk(root / speaker, lambda name: ESD_AUDIO.match(name) is not None, roots):
            if isinstance(rel, WalkProblem):
                yield WalkProblem(f"{speaker}/{rel.rel}".rstrip("/"), rel.reason, rel.message).ref(
                    dataset, source_index)
            elif "/" in rel:  # audio lives in <Emotion>/ folders; ignore stray files next to <spk>.txt
                yield ClipRef(id=make_id(dataset, rel.rsplit('/', 1)[1].rsplit('.', 1)[0]), source=source_index,
                              locator=f"{speaker}/{rel}")


def load_esd_clip(root: CorpusPath, locator: str, *, clip_id: str, dataset: str, language: str | None,
                  extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    real = (roots or Roots.of(root)).check(str(root / locator))
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, str(root / locator))
    parts = locator.split("/")
    speaker, emotion, utt = parts[0], parts[1], parts[-1].rsplit(".", 1)[0]
    split = parts[2] if len(parts) > 3 else None
    txt = root / speaker / f"{speaker}.txt"
    text, _ = _esd_transcripts(metadata_key(txt, "ESD transcript file", _esd_transcript_fix(speaker))).get(
        utt, (None, None))
    corpus_language = "zh" if speaker.isdigit() and int(speaker) <= 10 else "en"
    labels = label_dict(extra_labels, [("speaker", speaker), ("emotion", emotion), ("split", split)])
    return Clip(id=clip_id, dataset=dataset, audio_uri=real, transcript=one_line(text),
                language=language or corpus_language, labels=labels)


def prepare_cremad(path: str | Path, dataset: str = "cremad", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_cremad_refs, load_cremad_clip, Path(path), dataset, allowed_roots)


def prepare_esd(path: str | Path, dataset: str = "esd", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_esd_refs, load_esd_clip, Path(path), dataset, allowed_roots)
