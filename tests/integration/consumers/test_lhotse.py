"""lhotse cut sets made with lhotse's own API from real speech, read by our adapter and run end to end.

The recordings are sample-corpus clips joined into longer ones (a mono three-speaker talk, a
same-speaker reading, a two-channel duo); the supervisions overlap their neighbours a little, as
forced alignments do. Every cut set is written by lhotse (`CutSet.to_file`), read back by
`prepare_lhotse` and by a real run (`flows.generate.run_plain`), and each row is checked against
lhotse's own `cut.load_audio()` of that cut, its supervisions' texts and speakers, and its seed.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lhotse
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

from flows.generate import run_plain
from schemas.config import SourceConfig, parse_config
from schemas.records import Clip, ReasonCode
from storage.objectstore import LocalStore
from storage.versions import file_key
from tasks.describe import load_bins
from tasks.features.pitch import estimate_pitch
from tasks.ingest import iter_refs, load_clip
from tasks.ingest.lhotse import prepare_lhotse
from tests.support.paths import REPO
from tests.support.stored import stored_rows

AUDIO = REPO / "examples" / "sample_corpus" / "audio"
SR = 16_000
TEXT = {r["id"]: r.get("transcript") for r in map(json.loads, (AUDIO.parent / "manifest.jsonl").read_text().splitlines())}
MALE, FEMALE, THIRD, MALE_2 = "librivox_ss01_0880", "arctic_slt_a0009", "cmu_goforward", "librivox_ss01_0890"
GO_FORWARD = "go forward ten meters"  # cmu_goforward's words (pocketsphinx's test transcript)


def _read(name: str) -> np.ndarray:
    path = next(AUDIO.glob(f"{name}.*"))
    samples, sr = sf.read(str(path), dtype="float32")
    assert sr == SR and samples.ndim == 1
    return samples


@dataclass
class Corpus:
    folder: Path
    audio: Path  # the recordings (absolute paths in the manifests): a sibling of `folder`, so allowed_roots
    cuts: dict[str, Any]  # cut id -> the lhotse cut, as lhotse reads it back from the files we ingest
    bounds: dict[str, float]


def _own(cut: Any) -> Any:
    """A trimmed cut's own supervision: the one that spans it."""
    return next(s for s in cut.supervisions if abs(s.start) < 1e-6 and abs(s.duration - cut.duration) < 1e-6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    work = tmp_path_factory.mktemp("lhotse_corpus")
    audio, folder = work / "audio", work / "manifests"
    audio.mkdir()
    folder.mkdir()
    male, female, third, male2 = _read(MALE), _read(FEMALE), _read(THIRD), _read(MALE_2)
    sf.write(audio / "talk.wav", np.concatenate([male, female, third]), SR, subtype="PCM_16")
    sf.write(audio / "reader.wav", np.concatenate([male, male2]), SR, subtype="PCM_16")
    n = max(len(male), len(female))
    duo = np.zeros((n, 2), dtype=np.float32)
    duo[: len(male), 0], duo[: len(female), 1] = male, female
    sf.write(audio / "duo.flac", duo, SR, subtype="PCM_16")

    b1, b2 = len(male) / SR, (len(male) + len(female)) / SR
    end = (len(male) + len(female) + len(third)) / SR
    recs = [Recording.from_file(audio / "talk.wav", recording_id="talk"),
            Recording.from_file(audio / "reader.wav", recording_id="reader"),
            Recording.from_file(audio / "duo.flac", recording_id="duo")]
    assert recs[2].num_channels == 2
    # Neighbouring supervisions overlap by ~0.1 s, as forced alignments of conversation do.
    sups = [
        SupervisionSegment(id="talk-m", recording_id="talk", start=0.0, duration=b1 + 0.1, text=TEXT[MALE],
                           speaker="ss01", gender="male", language="English", custom={"act": "inform", "age": "40"}),
        SupervisionSegment(id="talk-f", recording_id="talk", start=b1 - 0.05, duration=b2 - b1 + 0.1,
                           text=TEXT[FEMALE], speaker="slt", gender="female", language="English",
                           custom={"act": "question", "sentiment": "positive"}),
        SupervisionSegment(id="talk-c", recording_id="talk", start=b2 - 0.05, duration=end - b2 + 0.05,
                           text=GO_FORWARD, speaker="cmu", language="English", custom={"act": "command"}),
        SupervisionSegment(id="reader-0", recording_id="reader", start=0.0, duration=b1, text=TEXT[MALE],
                           speaker="ss01", gender="male", language="English"),
        SupervisionSegment(id="reader-1", recording_id="reader", start=b1, duration=len(male2) / SR,
                           text=TEXT[MALE_2], speaker="ss01", gender="male", language="English"),
        SupervisionSegment(id="duo-m", recording_id="duo", start=0.0, duration=b1, channel=0, text=TEXT[MALE],
                           speaker="ss01", gender="male", language="English"),
        SupervisionSegment(id="duo-f", recording_id="duo", start=0.0, duration=len(female) / SR, channel=1,
                           text=TEXT[FEMALE], speaker="slt", gender="female", language="English"),
    ]
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recs),
                                 supervisions=SupervisionSet.from_segments(sups))
    by_rec = {c.recording_id: c for c in cuts}
    talk, duo = by_rec["talk"], by_rec["duo"]
    assert type(duo).__name__ == "MultiCut"
    trimmed = talk.trim_to_supervisions()  # keep_overlapping=True: neighbours come along, partially
    assert all(len(c.supervisions) >= 2 for c in trimmed)
    left, right = talk.split(timestamp=2.0)
    sets = {
        "trimmed": [c.with_id(f"trim-{_own(c).id}") for c in trimmed],
        "whole": [talk.with_id("talk-whole"), by_rec["reader"].with_id("reader-whole")],
        "slices": [talk.truncate(offset=0.0, duration=b2 + 0.115).with_id("slice-mf"),
                   talk.truncate(offset=b1 - 0.09, duration=b2 - b1 + 0.2).with_id("slice-f"),
                   left.with_id("split-left"), right.with_id("split-right")],
        "duo": [duo.with_id("duo-whole"),
                *[c.with_id(f"duo-trim-{_own(c).id}") for c in CutSet.from_cuts([duo]).trim_to_supervisions(
                    keep_all_channels=True)],
                *[c.with_id(f"duo-mono-{_own(c).id}") for c in CutSet.from_cuts([duo]).trim_to_supervisions(
                    keep_overlapping=False)]],
    }
    for name, items in sets.items():
        CutSet.from_cuts(items).to_file(folder / f"cuts_{name}.jsonl.gz")
    read_back = {c.id: c for name in sets for c in CutSet.from_file(folder / f"cuts_{name}.jsonl.gz")}
    # Relative audio paths, as lhotse recipes often write them, resolve from where lhotse ran.
    return Corpus(folder, audio, read_back, {"b1": b1, "b2": b2, "end": end})


@pytest.fixture(scope="module")
def clips(corpus: Corpus) -> dict[str, Clip]:
    return {c.id.split("/", 1)[1]: c for c in prepare_lhotse(corpus.folder, "talk", [str(corpus.audio)])}


def _run(corpus: Corpus, root: Path, llm: dict[str, Any] | None = None,
         **source: Any) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    config = parse_config({"sources": [{"kind": "lhotse", "path": str(corpus.folder), "dataset": "talk",
                                        "allowed_roots": [str(corpus.audio)], **source}],
                           "output": {"root": str(root), "dataset": "talk", "shard_size": 50},
                           **({"llm": llm} if llm else {})}, environ={})
    manifest = run_plain(config)
    rows = list(stored_rows(LocalStore(root), manifest).values())  # audio bytes from the audio files
    quarantine = [r for s in manifest.quarantine for r in pq.read_table(root / file_key(manifest, s)).to_pylist()]
    return {r["id"].split("/", 1)[1]: r for r in rows}, quarantine


@pytest.fixture(scope="module")
def rows(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    by_id, quarantine = _run(corpus, tmp_path_factory.mktemp("lhotse_run"))
    assert quarantine == []
    return by_id


def _mono(cut: Any) -> np.ndarray:
    samples = cut.load_audio()
    assert cut.sampling_rate == SR
    return samples.mean(axis=0) if samples.shape[0] > 1 else samples[0]


def test_lhotse_is_the_dev_extra_pin() -> None:
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    assert pins["lhotse"] == lhotse.__version__


def test_every_cut_is_one_clip_and_partial_neighbours_add_nothing(corpus: Corpus, clips: dict[str, Clip]) -> None:
    assert set(clips) == set(corpus.cuts)
    for sup, words, speaker, gender in [("talk-m", TEXT[MALE], "ss01", "male"),
                                        ("talk-f", TEXT[FEMALE], "slt", "female"),
                                        ("talk-c", GO_FORWARD, "cmu", None)]:
        cut, clip = corpus.cuts[f"trim-{sup}"], clips[f"trim-{sup}"]
        assert len(cut.supervisions) >= 2  # lhotse kept the overlapping neighbours in the cut...
        assert clip.transcript == words and clip.spans == []  # ...but only the cut's own one speaks for it
        assert clip.labels.get("speaker") == speaker and clip.labels.get("gender") == gender
        assert clip.labels["recording_id"] == "talk" and clip.language == "English"
    assert clips["trim-talk-m"].labels["act"] == "inform" and clips["trim-talk-m"].labels["age"] == "40"
    assert "sentiment" not in clips["trim-talk-m"].labels
    # Default seed labels: supervision custom keys that are not canonical attributes (age is).
    assert [(s.label, s.display) for s in clips["trim-talk-f"].seed_labels] == [("act", "Act"),
                                                                                 ("sentiment", "Sentiment")]
    assert [s.label for s in clips["trim-talk-m"].seed_labels] == ["act"]


def test_slices_take_only_the_supervisions_inside(clips: dict[str, Clip]) -> None:
    single = clips["slice-f"]
    assert single.transcript == TEXT[FEMALE] and single.labels["gender"] == "female" and single.spans == []
    left = clips["split-left"]  # cuts through the male supervision: no text, no speaker
    assert left.transcript is None and left.spans == [] and "speaker" not in left.labels
    right = clips["split-right"]
    assert [(s.speaker, s.text) for s in right.spans] == [("slt", TEXT[FEMALE]), ("cmu", GO_FORWARD)]
    assert right.transcript == f"{TEXT[FEMALE]} {GO_FORWARD}"
    two = clips["slice-mf"]
    assert [s.speaker for s in two.spans] == ["ss01", "slt"]


def test_several_supervisions_become_spans_with_their_own_labels(corpus: Corpus, clips: dict[str, Clip]) -> None:
    whole = clips["talk-whole"]
    assert [s.speaker for s in whole.spans] == ["ss01", "slt", "cmu"]
    assert [s.labels.get("gender") for s in whole.spans] == ["male", "female", None]
    assert [s.labels["act"] for s in whole.spans] == ["inform", "question", "command"]
    assert whole.spans[1].start_s == pytest.approx(corpus.bounds["b1"] - 0.05, abs=1e-3)
    assert whole.spans[1].end_s == pytest.approx(corpus.bounds["b2"] + 0.05, abs=1e-3)
    assert whole.transcript == f"{TEXT[MALE]} {TEXT[FEMALE]} {GO_FORWARD}"
    # Speaker fields differ between spans, so none is the clip's; an agreed one is.
    assert "speaker" not in whole.labels and "gender" not in whole.labels
    reader = clips["reader-whole"]
    assert [s.text for s in reader.spans] == [TEXT[MALE], TEXT[MALE_2]]
    assert reader.labels["speaker"] == "ss01" and reader.labels["gender"] == "male"
    duo = clips["duo-whole"]  # two channels, one speaker each, talking at once
    assert sorted((s.speaker, s.labels["gender"]) for s in duo.spans) == [("slt", "female"), ("ss01", "male")]
    one_speaker = clips["duo-trim-duo-m"]  # both channels, but the longer female supervision sticks out
    assert one_speaker.transcript == TEXT[MALE] and one_speaker.labels["gender"] == "male"
    assert one_speaker.spans == []
    both = clips["duo-trim-duo-f"]  # both channels, and the shorter male supervision lies inside it
    assert sorted(s.speaker or "" for s in both.spans) == ["slt", "ss01"]
    assert clips["duo-mono-duo-f"].transcript == TEXT[FEMALE]


def test_row_audio_is_what_lhotse_loads(corpus: Corpus, rows: dict[str, dict[str, Any]]) -> None:
    assert set(rows) == set(corpus.cuts)
    for cut_id, cut in corpus.cuts.items():
        theirs = _mono(cut)
        ours, sr = sf.read(io.BytesIO(rows[cut_id]["audio"]["bytes"]), dtype="float32")
        assert sr == SR and ours.ndim == 1, cut_id
        assert abs(len(ours) - len(theirs)) <= 2, (cut_id, len(ours), len(theirs))
        n = min(len(ours), len(theirs))
        corr = float(np.corrcoef(ours[:n], theirs[:n])[0, 1])
        assert corr > 0.999, (cut_id, corr)
        assert rows[cut_id]["duration_s"] == pytest.approx(cut.duration, abs=2 / SR)


def test_trimmed_cut_seed_is_its_own_speaker(rows: dict[str, dict[str, Any]]) -> None:
    male = rows["trim-talk-m"]
    seed = male["seed_description"]
    assert seed.startswith(f"[00:00-00:03] {TEXT[MALE]} (Gender: Male, Age: 40, ")
    assert seed.endswith(", Act: inform)") and seed.count("[") == 1
    assert "Female" not in seed and "question" not in seed and "Sentiment" not in seed
    assert male["transcript"] == TEXT[MALE] and male["segments"] == []
    sources = json.loads(male["attribute_sources"])
    assert sources["Gender"] == "labels.gender" and sources["Age"] == "labels.age"
    assert sources["Act"] == "labels.act" and sources["Pitch"] == "features.pitch_mean_hz"
    assert set(sources) == set(json.loads(male["attributes"]))
    female = rows["trim-talk-f"]["seed_description"]
    assert "Gender: Female" in female and female.endswith(", Act: question, Sentiment: positive)")
    assert "Male" not in female and "Age" not in female


def test_multi_speaker_cut_seed_has_one_span_per_supervision(rows: dict[str, dict[str, Any]]) -> None:
    row = rows["talk-whole"]
    seed = row["seed_description"]
    spans = re.findall(r"\[(\d\d:\d\d)-(\d\d:\d\d)\]([^\[]*)", seed)
    assert [(a, b) for a, b, _ in spans] == [("00:00", "00:09"), ("00:00", "00:03"), ("00:03", "00:06"),
                                             ("00:06", "00:09")]
    whole_clip, male, female, third = (body.strip() for _, _, body in spans)
    assert whole_clip.startswith("(Noise level: ") and "Gender" not in whole_clip  # clip-wide words only
    assert male.startswith(f"{TEXT[MALE]} (Gender: Male, Age: 40, Pitch: ")
    assert male.endswith("Act: inform)") and "Female" not in male
    assert female.startswith(f"{TEXT[FEMALE]} (Gender: Female, Pitch: ")
    assert female.endswith("Act: question, Sentiment: positive)")
    assert third.startswith(f"{GO_FORWARD} (Gender: ") and third.endswith("Act: command)")
    segments = row["segments"]
    assert [s["speaker"] for s in segments] == ["ss01", "slt", "cmu"]
    assert [json.loads(s["attributes"])["Gender"] for s in segments[:2]] == ["Male", "Female"]
    assert json.loads(segments[1]["labels"]) == {"speaker": "slt", "gender": "female", "act": "question",
                                                 "sentiment": "positive"}
    attributes, sources = json.loads(row["attributes"]), json.loads(row["attribute_sources"])
    assert attributes["Act"] == "inform, question, command" and attributes["Gender"].startswith("Male, Female")
    assert sources["Gender"].startswith("labels.gender, pitch_heuristic")  # cmu's span has no gender label
    assert sources["Noise level"] == "features.snr_db" and sources["Act"] == "labels.act"
    reader = rows["reader-whole"]["seed_description"]  # same speaker: one span per supervision is fine
    assert reader.count("Gender: Male") == 2 and "Female" not in reader


def test_span_pitch_is_measured_on_that_span(corpus: Corpus, rows: dict[str, dict[str, Any]]) -> None:
    """Each span's Pitch word is its own speaker's pitch (on lhotse's audio of that supervision),
    not the mixture's: the whole clip's mean F0 would give other words."""
    bins = load_bins(None)
    whole_cut = corpus.cuts["talk-whole"]
    mixture = estimate_pitch(_mono(whole_cut), SR).mean_hz
    assert mixture is not None
    differs = 0
    for segment, sup, gender in zip(rows["talk-whole"]["segments"][:2], whole_cut.supervisions[:2],
                                    ("male", "female"), strict=True):
        own = estimate_pitch(_mono(whole_cut.truncate(offset=sup.start, duration=sup.duration)), SR).mean_hz
        assert own is not None
        word = json.loads(segment["attributes"])["Pitch"]
        assert word == bins.pitch.scales[gender].word(own)
        differs += word != bins.pitch.scales[gender].word(mixture)
    assert differs >= 1


def test_multi_speaker_quarantine_and_seed_label_override(corpus: Corpus) -> None:
    sources = [SourceConfig(kind="lhotse", path=str(corpus.folder), dataset="talk", multi_speaker="quarantine",
                            seed_labels=["sentiment: Mood"], allowed_roots=[str(corpus.audio)])]
    loaded = {ref.id.split("/", 1)[1]: load_clip(ref, sources) for ref in iter_refs(sources)}
    held = {k for k, c in loaded.items() if c.ingest_error and c.ingest_error[0] is ReasonCode.multi_speaker}
    assert held == {"talk-whole", "slice-mf", "split-right", "duo-whole", "duo-trim-duo-f"}
    assert "ss01" in loaded["talk-whole"].ingest_error[1] and "slt" in loaded["talk-whole"].ingest_error[1]
    assert loaded["reader-whole"].ingest_error is None  # several supervisions, one speaker
    assert [(s.label, s.display) for s in loaded["trim-talk-f"].seed_labels] == [("sentiment", "Mood")]


def test_quarantined_run_and_overridden_seed(corpus: Corpus, tmp_path: Path) -> None:
    by_id, quarantine = _run(corpus, tmp_path, multi_speaker="quarantine", seed_labels=["sentiment: Mood"])
    assert sorted(q["id"] for q in quarantine) == ["talk/duo-trim-duo-f", "talk/duo-whole", "talk/slice-mf",
                                                   "talk/split-right", "talk/talk-whole"]
    assert {q["reason_code"] for q in quarantine} == {"multi_speaker"} and {q["stage"] for q in quarantine} == {
        "ingest"}
    seed = by_id["trim-talk-f"]["seed_description"]
    assert seed.endswith(", Mood: positive)") and "Act" not in seed
    assert len(by_id) + len(quarantine) == len(corpus.cuts)


def test_a_regeneration_describes_multi_speaker_cuts_from_the_stored_audio(
        corpus: Corpus, rows: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that changes only the LLM decodes no source (audio stored once) yet describes each
    supervision's span again, measured on the stored audio: the same seeds, spans and words."""
    import tasks.measure

    first, _ = _run(corpus, tmp_path)
    decoded: list[str] = []
    real = tasks.measure.load_audio
    monkeypatch.setattr(tasks.measure, "load_audio", lambda clip, cfg: decoded.append(clip.id) or real(clip, cfg))
    second, quarantine = _run(corpus, tmp_path, llm={"seed": 9, "temperature": 0.3})
    assert decoded == [] and quarantine == []
    assert set(second) == set(first) == set(rows)
    multi = [k for k, r in first.items() if len(r["segments"] or []) >= 2 and r["segments"][0]["speaker"]]
    assert {"talk-whole", "duo-whole"} <= set(multi)
    for cut in multi:
        assert second[cut]["seed_description"] == first[cut]["seed_description"], cut
        assert second[cut]["segments"] == first[cut]["segments"], cut
        assert second[cut]["attributes"] == first[cut]["attributes"], cut
        assert second[cut]["audio"] == first[cut]["audio"], cut
