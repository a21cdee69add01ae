"""VCTK (`prepare_vctk`): CSTR VCTK Corpus 0.92 and the older 0.80 release.

Layouts:
  0.92  wav48_silence_trimmed/<spk>/<spk>_<utt>_mic1.flac (and _mic2), txt/<spk>/<spk>_<utt>.txt
  0.80  wav48/<spk>/<spk>_<utt>.wav, txt/<spk>/<spk>_<utt>.txt
and `speaker-info.txt` at the top ("ID AGE GENDER ACCENTS REGION [COMMENTS]", whitespace separated;
0.80 writes ids without the `p`). Each utterance is one clip, id `<spk>_<utt>`: mic1 when present,
else mic2 (label `mic`). Labels: speaker, gender, age, accent, region (and comment), verbatim.
Seed labels by default: `region` as `Region` (gender, age and accent are canonical attributes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from schemas.attributes import SeedLabel
from schemas.records import Clip, ReasonCode
from tasks.ingest.common import ClipRef, CorpusPath, SourceError, label_dict, make_id, one_line, path_of
from tasks.ingest.files import FileKey, metadata_key, read_text
from tasks.ingest.paths import Rejected, Roots, WalkProblem, prepare, walk

AUDIO_DIRS = ("wav48_silence_trimmed", "wav48")
AUDIO_NAME = re.compile(r"^([A-Za-z]*\d+)_(\d+)(?:_(mic\d))?\.(?:flac|wav)$", re.IGNORECASE)
SPEAKER_INFO = "speaker-info.txt"
SEED_LABELS = [SeedLabel(label="region", display="Region")]
SPEAKER_INFO_FIX = ("it ships at the top of the VCTK corpus (next to txt/ and wav48*/): "
                    "restore it from the corpus archive, or use kind: folder to ingest without speaker labels")


def _audio_dir(root: CorpusPath) -> CorpusPath:
    for name in AUDIO_DIRS:
        if (root / name).is_dir():
            return root / name
    raise SourceError(f"{root}: no {' or '.join(AUDIO_DIRS)}/ folder; point sources[].path at the VCTK corpus "
                      "folder (the one holding speaker-info.txt, txt/ and the wav48 audio folder)")


@lru_cache(maxsize=4)
def _speaker_info(key: FileKey) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for line in read_text(path_of(key[0])).splitlines():
        tokens = line.split()
        if len(tokens) < 3 or tokens[0].upper() == "ID":
            continue
        speaker = f"p{tokens[0]}" if tokens[0].isdigit() else tokens[0]
        rest = " ".join(tokens[4:])
        region, _, comment = rest.partition("(")
        out[speaker] = {"age": tokens[1], "gender": tokens[2], "accent": tokens[3] if len(tokens) > 3 else "",
                        "region": region.strip(), "comment": comment.rstrip(") ").strip()}
    return out


def _mic_rank(mic: str | None) -> tuple[int, str]:
    return (0, "") if mic in (None, "mic1") else (1, mic or "")


def iter_vctk_refs(root: CorpusPath, source_index: int, dataset: str, *, roots: Roots | None = None) -> Iterator[ClipRef]:
    """One ref per utterance (preferring mic1), speakers and utterances in sorted order; a speaker
    folder that cannot be entered is a quarantine ref (see `paths.walk`)."""
    metadata_key(root / SPEAKER_INFO, "VCTK speaker list", SPEAKER_INFO_FIX)
    audio_dir = _audio_dir(root)
    count = 0
    best: dict[str, dict[str, tuple[tuple[int, str], str]]] = {}  # speaker -> utt -> (rank, file name)
    for item in walk(audio_dir, lambda name: AUDIO_NAME.match(name) is not None, roots or Roots.of(root)):
        if isinstance(item, WalkProblem):
            yield WalkProblem(f"{audio_dir.name}/{item.rel}".rstrip("/"), item.reason, item.message).ref(
                dataset, source_index)
            continue
        speaker, _, name = item.rpartition("/")
        m = AUDIO_NAME.match(name)
        if not speaker or "/" in speaker or speaker.startswith(".") or m is None:
            continue  # only <audio dir>/<speaker>/<file>
        utt = f"{m.group(1)}_{m.group(2)}"
        rank = _mic_rank(m.group(3))
        mine = best.setdefault(speaker, {})
        if utt not in mine or rank < mine[utt][0]:
            mine[utt] = (rank, name)
    for speaker in sorted(best):
        for utt in sorted(best[speaker]):
            count += 1
            rel = f"{audio_dir.name}/{speaker}/{best[speaker][utt][1]}"
            yield ClipRef(id=make_id(dataset, utt), source=source_index, locator=rel)
    if count == 0:
        raise SourceError(f"{audio_dir}: no VCTK audio (<spk>/<spk>_<utt>_mic1.flac or <spk>/<spk>_<utt>.wav)")


def load_vctk_clip(root: CorpusPath, locator: str, *, clip_id: str, dataset: str, language: str | None,
                   extra_labels: dict[str, str], roots: Roots | None = None) -> Clip:
    audio = root / locator
    m = AUDIO_NAME.match(audio.name)
    if m is None:  # locators come from iter_vctk_refs; a hand-edited plan is not worth a crash
        raise SourceError(f"{audio}: not a VCTK audio file name")
    real = (roots or Roots.of(root)).check(str(audio))
    if isinstance(real, Rejected):
        return real.clip(clip_id, dataset, str(audio))
    speaker, utt, mic = m.group(1), f"{m.group(1)}_{m.group(2)}", m.group(3)
    info = _speaker_info(metadata_key(root / SPEAKER_INFO, "VCTK speaker list", SPEAKER_INFO_FIX)).get(speaker, {})
    try:
        transcript = one_line(read_text(root / "txt" / speaker / f"{utt}.txt"))
    except FileNotFoundError:
        transcript = None  # a few VCTK utterances (and all of p315) have no text
    except SourceError as exc:  # a FIFO or device in the transcript's place
        return Clip(id=clip_id, dataset=dataset, audio_uri=real, ingest_error=(ReasonCode.not_a_file, str(exc)))
    labels = label_dict(extra_labels, [("speaker", speaker), ("gender", info.get("gender")), ("age", info.get("age")),
                                       ("accent", info.get("accent")), ("region", info.get("region")),
                                       ("comment", info.get("comment")), ("mic", mic)])
    return Clip(id=clip_id, dataset=dataset, audio_uri=real, transcript=transcript,
                language=language or "en", labels=labels, seed_labels=SEED_LABELS)


def prepare_vctk(path: str | Path, dataset: str = "vctk", allowed_roots: Iterable[str] = ()) -> Iterator[Clip]:
    """Every clip of the corpus at `path`, lazily (what a run ingests, without planning or shards);
    audio is read below `path` and `allowed_roots` only."""
    return prepare(iter_vctk_refs, load_vctk_clip, Path(path), dataset, allowed_roots)
