"""Corpus adapters on small fixture trees built in each corpus's real layout.

Every test goes through the public API (`iter_refs`, `load_clip`, `load_audio`) with a
`SourceConfig(kind=...)`, as the planner and a shard do.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from schemas.config import DEFAULT_ATTRIBUTES, AudioConfig, RunConfig, SourceConfig
from schemas.records import Clip, Features, QuarantineError, ReasonCode, Stage
from storage.objectstore import LocalStore
from tasks.audio import load_audio
from tasks.describe import describe_attributes, load_bins
from tasks.features.labels import resolve_attributes
from tasks.ingest import SourceError, iter_refs, load_clip, source_fingerprint, source_kind
from tasks.ingest.vctk import prepare_vctk
from tasks.plan import load_shard_plan, plan_run
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3

AUDIO = AudioConfig()
SAMPLE_AUDIO = REPO / "examples" / "sample_corpus" / "audio"


def tone(path: Path, seconds: float = 0.6, sr: int = 16000, channels: int = 1, freq: float = 220.0) -> Path:
    """A short synthetic clip (format from the suffix: .wav, .flac)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([mono * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else mono
    sf.write(path, data, sr)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def clips_of(source: SourceConfig) -> dict[str, Clip]:
    sources = [source]
    return {ref.id: load_clip(ref, sources) for ref in iter_refs(sources)}


def ids_of(source: SourceConfig) -> list[str]:
    return [ref.id for ref in iter_refs([source])]


def decodes(clip: Clip) -> float:
    assert clip.ingest_error is None, clip.ingest_error
    audio = load_audio(clip, AUDIO)
    assert audio.sampling_rate == 16000 and audio.samples.size > 0
    return audio.duration_s


def quarantined(clip: Clip) -> ReasonCode:
    if clip.ingest_error is not None:
        return clip.ingest_error[0]
    with pytest.raises(QuarantineError) as info:
        load_audio(clip, AUDIO)
    assert info.value.stage is Stage.audio
    return info.value.reason


# ---------------------------------------------------------------- fixture trees

SPEAKERS_TXT = """\
; Some pipe(|) separated metadata about all LibriVox readers, whose work was used
; in the corpus.
;ID  |SEX| SUBSET           |MINUTES| NAME
103  | F | train-clean-100  | 25.00 | Karen Savage
1919 | M | dev-clean        | 8.04  | Mark Nelson
"""


def librispeech_tree(tmp: Path) -> Path:
    root = tmp / "LibriSpeech"
    write(root / "SPEAKERS.TXT", SPEAKERS_TXT)
    split = root / "dev-clean"
    for spk, chap, utts in [("1919", "142785", ["0008", "0005"]), ("103", "1240", ["0000"])]:
        lines = []
        for utt in utts:
            tone(split / spk / chap / f"{spk}-{chap}-{utt}.flac")
            lines.append(f"{spk}-{chap}-{utt} UTTERANCE {utt} OF CHAPTER {chap}")
        write(split / spk / chap / f"{spk}-{chap}.trans.txt", "\n".join(lines) + "\n")
    return root


def libritts_tree(tmp: Path) -> Path:
    root = tmp / "LibriTTS_R"
    write(root / "speakers.tsv", "READER\tGENDER\tSUBSET\tNAME\n19\tF\ttrain-clean-100\tKara Shallenberg\n"
          "84\tF\tdev-clean\tChristie Nowak\n")
    chap = root / "train-clean-100" / "19" / "198"
    for utt, norm, orig in [("19_198_000000_000000", "Northanger Abbey, chapter one.", "Northanger Abbey, Chapter I."),
                            ("19_198_000001_000003", "No one who had ever seen Catherine...", None)]:
        tone(chap / f"{utt}.wav", sr=24000)
        if orig is not None:
            write(chap / f"{utt}.normalized.txt", norm)
            write(chap / f"{utt}.original.txt", orig)
    # The second utterance has no per-utterance text: the chapter's trans.tsv has it.
    write(chap / "19_198.trans.tsv", "19_198_000000_000000\tNorthanger Abbey, Chapter I.\tNorthanger Abbey, "
          "chapter one.\n19_198_000001_000003\tNo one who had ever seen Catherine...\tNo one who had ever seen "
          "Catherine...\n")
    tone(root / "dev-clean" / "84" / "121123" / "84_121123_000007_000001.wav", sr=24000)
    write(root / "dev-clean" / "84" / "121123" / "84_121123_000007_000001.normalized.txt", "Maximilian.")
    return root


SPEAKER_INFO = """\
ID  AGE  GENDER  ACCENTS  REGION COMMENTS 
p225  23  F    English    Southern  England
p226  22  M    English    Surrey
p280  25  F    France     Paris  (mic2 files unavailable)
"""


def vctk_tree(tmp: Path) -> Path:
    root = tmp / "VCTK-Corpus-0.92"
    write(root / "speaker-info.txt", SPEAKER_INFO)
    audio = root / "wav48_silence_trimmed"
    tone(audio / "p225" / "p225_001_mic1.flac", sr=48000)
    tone(audio / "p225" / "p225_001_mic2.flac", sr=48000)
    tone(audio / "p225" / "p225_002_mic2.flac", sr=48000)  # no mic1 recording: mic2 stands in
    (audio / "p226").mkdir()
    shutil.copy(SAMPLE_AUDIO / "arctic_awb_a0007.flac", audio / "p226" / "p226_003_mic1.flac")
    tone(audio / "p280" / "p280_010_mic1.flac", sr=48000)
    write(root / "txt" / "p225" / "p225_001.txt", "Please call Stella.\n")
    write(root / "txt" / "p225" / "p225_002.txt", "Ask her to bring these things with her from the store.\n")
    write(root / "txt" / "p226" / "p226_003.txt", "Six spoons of fresh snow peas.\n")
    write(audio / "log.txt", "not audio")
    return root


CV_HEADER = ("client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\t"
             "accents\tvariant\tlocale\tsegment\n")


def commonvoice_tree(tmp: Path) -> Path:
    root = tmp / "cv-corpus-17.0-2024-03-15" / "en"
    (root / "clips").mkdir(parents=True)
    shutil.copy(SAMPLE_AUDIO / "librivox_ss01_0930.mp3", root / "clips" / "common_voice_en_41236.mp3")
    shutil.copy(SAMPLE_AUDIO / "librivox_ss01_0930.mp3", root / "clips" / "common_voice_en_17.mp3")
    rows = [
        ["a1b2" * 16, "common_voice_en_41236.mp3", "s1", 'He said "fine" and left.', "", "2", "0", "twenties",
         "male_masculine", "United States English", "", "en", ""],
        ["c3d4" * 16, "common_voice_en_17.mp3", "s2", "The quick brown fox.", "", "3", "1", "fourties",
         "female_feminine", "England English|Scottish English", "", "en", "Benchmark"],
        ["e5f6" * 16, "common_voice_en_99.mp3", "s3", "This clip never arrived.", "", "2", "0", "", "", "", "",
         "en", ""],
    ]
    write(root / "validated.tsv", CV_HEADER + "".join("\t".join(r) + "\n" for r in rows))
    write(root / "train.tsv", CV_HEADER)
    return root


DEMOGRAPHICS = """\
ActorID,Age,Sex,Race,Ethnicity
1001,51,Male,Caucasian,Not Hispanic
1091,29,Female,Asian,Not Hispanic
"""


def cremad_tree(tmp: Path) -> Path:
    root = tmp / "CREMA-D"
    write(root / "VideoDemographics.csv", DEMOGRAPHICS)
    tone(root / "AudioWAV" / "1091_IEO_HAP_HI.wav")
    tone(root / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    write(root / "AudioWAV" / "README.txt", "not a clip")
    return root


def esd_tree(tmp: Path) -> Path:
    root = tmp / "Emotion Speech Dataset"
    write(root / "0011" / "0011.txt", "0011_000001\tThe nine the eggs, I keep.\tNeutral\n"
          "0011_000351\tI'll go and fetch it.\tAngry\n")
    tone(root / "0011" / "Neutral" / "0011_000001.wav")
    tone(root / "0011" / "Angry" / "train" / "0011_000351.wav")
    (root / "0001").mkdir()
    # Mandarin transcripts may come in GB18030 rather than UTF-8: both read.
    (root / "0001" / "0001.txt").write_bytes("0001_000701\t打远一看，它们的确很美。\t快乐\n".encode("gb18030"))
    tone(root / "0001" / "Happy" / "evaluation" / "0001_000701.wav")
    return root


def lhotse_tree(tmp: Path) -> Path:
    """A cuts manifest: whole-file cut, a segment of one channel, a mixed cut, a cut of a missing file."""
    root = tmp / "lhotse"
    long_file = tone(root / "audio" / "meeting.wav", seconds=3.0, channels=2)
    rec_long = {"id": "meeting", "sources": [{"type": "file", "channels": [0, 1], "source": "audio/meeting.wav"}],
                "sampling_rate": 16000, "num_samples": 48000, "duration": 3.0, "channel_ids": [0, 1]}
    flac = SAMPLE_AUDIO / "cmu_goforward.flac"
    info = sf.info(str(flac))
    rec_whole = {"id": "goforward", "sources": [{"type": "file", "channels": [0], "source": str(flac)}],
                 "sampling_rate": info.samplerate, "num_samples": info.frames, "duration": info.duration,
                 "channel_ids": [0]}
    rec_missing = dict(rec_whole, id="gone", sources=[{"type": "file", "channels": [0], "source": "audio/gone.flac"}])
    cuts = [
        {"id": "goforward-0", "start": 0.0, "duration": info.duration, "channel": 0, "recording": rec_whole,
         "supervisions": [{"id": "goforward-sup", "recording_id": "goforward", "start": 0.0,
                           "duration": info.duration, "channel": 0, "text": "Go forward ten meters.",
                           "language": "English", "speaker": "cmu", "gender": "M",
                           "custom": {"emotion": "neutral", "snr": 31.5}}],
         "custom": {"split": "train"}, "type": "MonoCut"},
        {"id": "meeting-1", "start": 0.5, "duration": 1.0, "channel": 1, "recording": rec_long,
         "supervisions": [{"id": "m1", "recording_id": "meeting", "start": 0.0, "duration": 1.0, "channel": 1,
                           "text": "second half", "speaker": "B"}], "type": "MonoCut"},
        {"id": "mix-0", "tracks": [{"cut": {"id": "a"}, "offset": 0.0}], "type": "MixedCut"},
        {"id": "gone-0", "start": 0.5, "duration": 1.0, "channel": 0, "recording": rec_missing,
         "supervisions": [], "type": "MonoCut"},
    ]
    with gzip.open(root / "cuts_train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(c) + "\n" for c in cuts))
    assert long_file.is_file()
    return root / "cuts_train.jsonl.gz"


def lhotse_pair_tree(tmp: Path) -> Path:
    """lhotse's prepare_* output: <corpus>_recordings_<part>.jsonl.gz + <corpus>_supervisions_<part>.jsonl.gz."""
    root = tmp / "manifests"
    tone(tmp / "download" / "talk.flac", seconds=2.0)
    recs = [{"id": "talk", "sources": [{"type": "file", "channels": [0], "source": "download/talk.flac"}],
             "sampling_rate": 16000, "num_samples": 32000, "duration": 2.0, "channel_ids": [0]}]
    sups = [{"id": "talk-0001", "recording_id": "talk", "start": 1.0, "duration": 0.8, "channel": 0,
             "text": "later words", "speaker": "s1", "gender": "F"},
            {"id": "talk-0000", "recording_id": "talk", "start": 0.0, "duration": 0.9, "channel": 0,
             "text": "first words", "speaker": "s1", "gender": "F", "custom": {"age": "30"}},
            {"id": "orphan-0000", "recording_id": "nowhere", "start": 0.0, "duration": 1.0, "channel": 0}]
    root.mkdir(parents=True)
    for name, rows in [("demo_recordings_dev.jsonl.gz", recs), ("demo_supervisions_dev.jsonl.gz", sups)]:
        with gzip.open(root / name, "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


def hf_parquet_tree(tmp: Path) -> Path:
    """A Hub-style data/ folder: datasets' own Parquet (Audio feature, small row groups) + a plain one."""
    datasets = pytest.importorskip("datasets")
    root = tmp / "hf" / "data"
    root.mkdir(parents=True)
    blobs = [(SAMPLE_AUDIO / n).read_bytes() for n in ("cmu_cards_002.wav", "cmu_cards_005.ogg", "cmu_goforward.flac")]
    features = datasets.Features({"audio": datasets.Audio(), "sentence": datasets.Value("string"),
                                  "speaker": datasets.Value("string"), "age": datasets.Value("int32"),
                                  "score": datasets.Value("float32"),
                                  "tags": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({
        "audio": [{"bytes": b, "path": f"clip{i}.wav"} for i, b in enumerate(blobs)]
        + [{"bytes": None, "path": str(tmp / "missing.wav")}],
        "sentence": ["two of cards", "five of cards", "go forward", "lost"],
        "speaker": ["a", "a", "b", None],
        "age": [30, 30, 41, 0],
        "score": [0.5, 0.25, 1.0, 0.0],
        "tags": [["x"], [], ["y"], []],
    }, features=features)
    ds.to_parquet(str(root / "train-00000-of-00001.parquet"), batch_size=2)
    # Without HF metadata, with an id column and a `text` column: found by convention.
    table = pa.table({"id": ["utt-b", "utt-a"], "text": ["go forward", "two of cards"],
                      "audio": pa.array([{"bytes": blobs[2], "path": "b.flac"}, {"bytes": blobs[0], "path": "a.wav"}],
                                        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "language": ["en", "en"], "emotion": ["happy", "sad"]})
    pq.write_table(table, root / "test-00000-of-00001.parquet", row_group_size=1)
    return root


KIND_TREES: dict[str, Callable[[Path], Path]] = {
    "librispeech": librispeech_tree, "libritts": libritts_tree, "vctk": vctk_tree,
    "commonvoice": commonvoice_tree, "cremad": cremad_tree, "esd": esd_tree,
    "lhotse": lhotse_tree, "hf_parquet": hf_parquet_tree,
}


# ---------------------------------------------------------------- one test per adapter


def test_librispeech_split_and_corpus_folder(tmp_path: Path) -> None:
    root = librispeech_tree(tmp_path)
    clips = clips_of(SourceConfig(kind="librispeech", path=str(root / "dev-clean"), dataset="ls"))
    assert list(clips) == ["ls/103-1240-0000", "ls/1919-142785-0005", "ls/1919-142785-0008"]
    c = clips["ls/1919-142785-0005"]
    assert c.transcript == "UTTERANCE 0005 OF CHAPTER 142785" and c.language == "en"
    assert c.labels == {"speaker": "1919", "chapter": "142785", "gender": "M", "subset": "dev-clean"}
    assert clips["ls/103-1240-0000"].labels["gender"] == "F"
    assert all(decodes(c) > 0.5 for c in clips.values())
    # The corpus folder works too; the subset is then the split folder the audio is in.
    whole = clips_of(SourceConfig(kind="librispeech", path=str(root), dataset="ls", labels={"corpus": "ls"}))
    assert whole["ls/103-1240-0000"].labels["subset"] == "dev-clean"
    assert whole["ls/103-1240-0000"].labels["corpus"] == "ls"


def test_libritts_r_transcripts_and_speaker_gender(tmp_path: Path) -> None:
    root = libritts_tree(tmp_path)
    clips = clips_of(SourceConfig(kind="libritts", path=str(root), dataset="ltts"))
    assert list(clips) == ["ltts/84_121123_000007_000001", "ltts/19_198_000000_000000", "ltts/19_198_000001_000003"]
    first = clips["ltts/19_198_000000_000000"]
    assert first.transcript == "Northanger Abbey, chapter one."
    assert first.labels == {"speaker": "19", "chapter": "198", "gender": "F", "subset": "train-clean-100",
                            "original_text": "Northanger Abbey, Chapter I."}
    assert clips["ltts/19_198_000001_000003"].transcript == "No one who had ever seen Catherine..."  # trans.tsv
    assert clips["ltts/84_121123_000007_000001"].labels["gender"] == "F"
    assert all(decodes(c) > 0.5 for c in clips.values())  # 24 kHz WAV resampled
    # LibriTTS's pipe-separated SPEAKERS.txt is read the same way.
    (root / "speakers.tsv").unlink()
    write(root / "SPEAKERS.txt", ";ID  |SEX| SUBSET           |MINUTES| NAME\n19   | M | train-clean-100  | 25.19 | K\n")
    again = clips_of(SourceConfig(kind="libritts", path=str(root / "train-clean-100"), dataset="ltts"))
    assert again["ltts/19_198_000000_000000"].labels["gender"] == "M"


def test_vctk_speaker_info_mics_and_transcripts(tmp_path: Path) -> None:
    root = vctk_tree(tmp_path)
    clips = clips_of(SourceConfig(kind="vctk", path=str(root), dataset="vctk"))
    assert list(clips) == ["vctk/p225_001", "vctk/p225_002", "vctk/p226_003", "vctk/p280_010"]
    c = clips["vctk/p225_001"]
    assert c.audio_uri.endswith("p225_001_mic1.flac") and c.transcript == "Please call Stella."
    assert c.labels == {"speaker": "p225", "gender": "F", "age": "23", "accent": "English", "region": "Southern England",
                        "mic": "mic1"}
    assert clips["vctk/p225_002"].labels["mic"] == "mic2"
    assert clips["vctk/p226_003"].labels["gender"] == "M" and clips["vctk/p226_003"].labels["region"] == "Surrey"
    p280 = clips["vctk/p280_010"]
    assert p280.transcript is None  # no txt file: Whisper fills it later
    assert (p280.labels["accent"], p280.labels["region"], p280.labels["comment"]) == \
        ("France", "Paris", "mic2 files unavailable")
    assert all(decodes(c) > 0.5 for c in clips.values())
    # The lhotse-style entry point yields the same clips, outside a run.
    assert [c.model_dump() for c in prepare_vctk(root)] == [c.model_dump() for c in clips.values()]


def test_vctk_080_layout(tmp_path: Path) -> None:
    root = tmp_path / "VCTK-Corpus"
    write(root / "speaker-info.txt", "ID  AGE  GENDER  ACCENTS  REGION\n225  23  F    English    Southern  England\n")
    tone(root / "wav48" / "p225" / "p225_001.wav", sr=48000)
    write(root / "txt" / "p225" / "p225_001.txt", "Please call Stella.")
    (clip,) = clips_of(SourceConfig(kind="vctk", path=str(root), dataset="v")).values()
    assert clip.id == "v/p225_001" and clip.labels["gender"] == "F" and "mic" not in clip.labels
    assert decodes(clip) > 0.5


def test_commonvoice_validated_tsv(tmp_path: Path) -> None:
    root = commonvoice_tree(tmp_path)
    clips = clips_of(SourceConfig(kind="commonvoice", path=str(root), dataset="cv"))
    assert list(clips) == ["cv/common_voice_en_41236", "cv/common_voice_en_17", "cv/common_voice_en_99"]
    c = clips["cv/common_voice_en_41236"]
    assert c.transcript == 'He said "fine" and left.'  # the TSVs are unquoted: quotes are text
    assert c.language == "en"
    assert c.labels["gender"] == "male_masculine" and c.labels["age"] == "twenties"
    assert c.labels["accent"] == "United States English" and c.labels["speaker"] == "a1b2" * 16
    assert c.labels["up_votes"] == "2" and "sentence" not in c.labels and "path" not in c.labels
    d = clips["cv/common_voice_en_17"]
    assert d.labels["accent"] == "England English|Scottish English" and d.labels["segment"] == "Benchmark"
    assert decodes(c) > 3.0 and decodes(d) > 3.0  # mp3
    # A row whose clip is missing from clips/ is a clip that ends in quarantine, not a crash.
    assert quarantined(clips["cv/common_voice_en_99"]) is ReasonCode.missing_file
    # A single TSV can be the source as well.
    assert ids_of(SourceConfig(kind="commonvoice", path=str(root / "train.tsv"), dataset="cv")) == []


def test_cremad_codes_and_demographics(tmp_path: Path) -> None:
    root = cremad_tree(tmp_path)
    clips = clips_of(SourceConfig(kind="cremad", path=str(root), dataset="crema"))
    assert list(clips) == ["crema/1001_DFA_ANG_XX", "crema/1091_IEO_HAP_HI"]
    c = clips["crema/1001_DFA_ANG_XX"]
    assert c.transcript == "Don't forget a jacket."
    assert c.labels == {"speaker": "1001", "emotion": "ANG", "intensity": "XX", "sentence": "DFA", "gender": "Male",
                        "age": "51", "race": "Caucasian", "ethnicity": "Not Hispanic"}
    h = clips["crema/1091_IEO_HAP_HI"]
    assert (h.labels["emotion"], h.labels["intensity"], h.labels["gender"], h.labels["race"]) == \
        ("HAP", "HI", "Female", "Asian")
    assert all(decodes(c) > 0.5 for c in clips.values())


def test_esd_emotion_folders_and_transcripts(tmp_path: Path) -> None:
    root = esd_tree(tmp_path)
    clips = clips_of(SourceConfig(kind="esd", path=str(root), dataset="esd"))
    assert list(clips) == ["esd/0001_000701", "esd/0011_000351", "esd/0011_000001"]
    zh = clips["esd/0001_000701"]
    assert zh.transcript == "打远一看，它们的确很美。" and zh.language == "zh"
    assert zh.labels == {"speaker": "0001", "emotion": "Happy", "split": "evaluation"}
    angry = clips["esd/0011_000351"]
    assert angry.transcript == "I'll go and fetch it." and angry.language == "en"
    assert angry.labels == {"speaker": "0011", "emotion": "Angry", "split": "train"}
    assert clips["esd/0011_000001"].labels == {"speaker": "0011", "emotion": "Neutral"}
    assert all(decodes(c) > 0.5 for c in clips.values())


def _seed_words(clip: Clip) -> dict[str, str]:
    """What a run writes into this clip's seed from its labels (no audio features measured)."""
    features = resolve_attributes(Features(), clip.labels, {}, {})
    return describe_attributes(features, clip.labels, load_bins(None), DEFAULT_ATTRIBUTES, clip.seed_labels).words


def test_adapter_default_seed_labels_and_source_override(tmp_path: Path) -> None:
    vctk = clips_of(SourceConfig(kind="vctk", path=str(vctk_tree(tmp_path)), dataset="vctk"))
    assert _seed_words(vctk["vctk/p225_001"]) == {"Gender": "Female", "Age": "23", "Accent": "English",
                                                   "Region": "Southern England"}
    crema_root = cremad_tree(tmp_path)
    crema = clips_of(SourceConfig(kind="cremad", path=str(crema_root), dataset="crema"))
    assert _seed_words(crema["crema/1091_IEO_HAP_HI"]) == {"Gender": "Female", "Emotion": "Happy", "Age": "29",
                                                           "Intensity": "High", "Race": "Asian"}
    assert "Intensity" not in _seed_words(crema["crema/1001_DFA_ANG_XX"])  # XX: intensity unspecified
    cv = clips_of(SourceConfig(kind="commonvoice", path=str(commonvoice_tree(tmp_path)), dataset="cv"))
    assert set(_seed_words(cv["cv/common_voice_en_41236"])) == {"Gender", "Age", "Accent"}  # no votes, no segment
    esd = clips_of(SourceConfig(kind="esd", path=str(esd_tree(tmp_path)), dataset="esd"))
    assert _seed_words(esd["esd/0011_000351"]) == {"Emotion": "Angry"}  # split is bookkeeping
    ls = clips_of(SourceConfig(kind="librispeech", path=str(librispeech_tree(tmp_path) / "dev-clean"), dataset="ls"))
    assert set(_seed_words(ls["ls/1919-142785-0005"])) == {"Gender"}
    # The source's setting replaces the default: other columns, or none.
    mine = clips_of(SourceConfig(kind="cremad", path=str(crema_root), dataset="crema",
                                 seed_labels=["ethnicity: Ethnicity", "sentence"]))
    assert list(_seed_words(mine["crema/1091_IEO_HAP_HI"]).items())[-2:] == [("Ethnicity", "Not Hispanic"),
                                                                             ("Sentence", "IEO")]
    none = clips_of(SourceConfig(kind="cremad", path=str(crema_root), dataset="crema", seed_labels=[]))
    assert set(_seed_words(none["crema/1091_IEO_HAP_HI"])) == {"Gender", "Emotion", "Age"}


def test_lhotse_cuts_whole_segment_mixed_and_missing(tmp_path: Path) -> None:
    manifest = lhotse_tree(tmp_path)
    # auto: a gzipped *cuts* JSONL is unambiguous; one recording holds an absolute path to the sample corpus
    source = SourceConfig(path=str(manifest), allowed_roots=[str(SAMPLE_AUDIO)])
    assert source_kind(source) == "lhotse"
    clips = clips_of(source)
    assert list(clips) == ["cuts_train/goforward-0", "cuts_train/meeting-1", "cuts_train/mix-0", "cuts_train/gone-0"]
    whole = clips["cuts_train/goforward-0"]
    assert whole.audio_bytes is None and whole.audio_uri == str(SAMPLE_AUDIO / "cmu_goforward.flac")
    assert whole.transcript == "Go forward ten meters." and whole.language == "English"
    assert whole.labels == {"recording_id": "goforward", "speaker": "cmu", "gender": "M", "emotion": "neutral",
                            "snr": "31.5", "split": "train"}
    segment = clips["cuts_train/meeting-1"]
    assert segment.audio_bytes is not None and segment.audio_uri.endswith("meeting.wav#t=0.500,1.500")
    assert decodes(segment) == pytest.approx(1.0, abs=1e-3)
    samples, _ = sf.read(io.BytesIO(segment.audio_bytes))
    assert np.max(np.abs(samples)) == pytest.approx(0.3, abs=0.01)  # channel 1 (full scale 0.3), not the mix
    assert decodes(whole) > 1.0
    mixed = clips["cuts_train/mix-0"]
    assert mixed.ingest_error is not None and mixed.ingest_error[0] is ReasonCode.bad_row
    assert "MixedCut" in mixed.ingest_error[1] and "cuts_train.jsonl.gz at byte" in mixed.ingest_error[1]
    assert quarantined(clips["cuts_train/gone-0"]) is ReasonCode.missing_file


def test_lhotse_recordings_with_supervisions_folder(tmp_path: Path) -> None:
    folder = lhotse_pair_tree(tmp_path)
    # The recordings' paths are relative to where lhotse ran (the manifests' parent): allowed explicitly.
    clips = clips_of(SourceConfig(kind="lhotse", path=str(folder), dataset="demo",
                                  allowed_roots=[str(tmp_path / "download")]))
    assert list(clips) == ["demo/talk-0001", "demo/talk-0000", "demo/orphan-0000"]
    late, early = clips["demo/talk-0001"], clips["demo/talk-0000"]
    assert late.transcript == "later words" and late.labels["gender"] == "F" and late.labels["speaker"] == "s1"
    assert early.labels["age"] == "30"
    assert decodes(late) == pytest.approx(0.8, abs=1e-3) and decodes(early) == pytest.approx(0.9, abs=1e-3)
    orphan = clips["demo/orphan-0000"]
    assert orphan.ingest_error is not None and "'nowhere'" in orphan.ingest_error[1]
    # Supervisions alone need their recordings manifest next to them.
    (folder / "demo_recordings_dev.jsonl.gz").unlink()
    with pytest.raises(SourceError, match="demo_recordings_dev.jsonl.gz: missing lhotse recordings manifest"):
        ids_of(SourceConfig(kind="lhotse", path=str(folder / "demo_supervisions_dev.jsonl.gz"), dataset="d"))


def test_hf_parquet_audio_column_by_row_groups(tmp_path: Path) -> None:
    root = hf_parquet_tree(tmp_path)
    assert pq.ParquetFile(root / "train-00000-of-00001.parquet").metadata.num_row_groups == 2
    # Row 3's path lies outside the source folder (tmp_path/missing.wav): allowed explicitly.
    clips = clips_of(SourceConfig(kind="hf_parquet", path=str(root.parent), dataset="hf",
                                  allowed_roots=[str(tmp_path)]))
    assert list(clips) == ["hf/utt-b", "hf/utt-a", "hf/data/train-00000-of-00001/000000",
                           "hf/data/train-00000-of-00001/000001", "hf/data/train-00000-of-00001/000002",
                           "hf/data/train-00000-of-00001/000003"]
    third = clips["hf/data/train-00000-of-00001/000002"]  # in the second row group
    assert third.audio_uri == f"{root / 'train-00000-of-00001.parquet'}#row=2"
    assert third.audio_bytes == (SAMPLE_AUDIO / "cmu_goforward.flac").read_bytes()
    assert third.transcript == "go forward"
    assert third.labels == {"speaker": "b", "age": "41", "score": "1.0"}  # lists are not labels
    b = clips["hf/utt-b"]
    assert b.transcript == "go forward" and b.language == "en" and b.labels == {"emotion": "happy"}
    for clip in clips.values():
        if not clip.id.endswith("000003"):
            assert decodes(clip) > 0.5  # wav, ogg and flac bytes, decoded from memory
    # A row with only a path to a file that is not there ends in quarantine, not a crash.
    assert quarantined(clips["hf/data/train-00000-of-00001/000003"]) is ReasonCode.missing_file
    # One file can be the source too.
    one = ids_of(SourceConfig(kind="hf_parquet", path=str(root / "test-00000-of-00001.parquet"), dataset="t"))
    assert one == ["t/utt-b", "t/utt-a"]
    write(root.parent / "bad" / "x.parquet", "")
    pq.write_table(pa.table({"text": ["no audio"]}), root.parent / "bad" / "x.parquet")
    with pytest.raises(SourceError, match="no audio column"):
        ids_of(SourceConfig(kind="hf_parquet", path=str(root.parent / "bad"), dataset="t"))


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize("kind", sorted(KIND_TREES))
def test_ids_stable_unique_and_planned_in_order(tmp_path: Path, kind: str) -> None:
    path = KIND_TREES[kind](tmp_path)
    source = SourceConfig(kind=kind, path=str(path), dataset="d")
    first, second = list(iter_refs([source])), list(iter_refs([source]))
    assert first == second and len({r.id for r in first}) == len(first)
    assert all(r.id.startswith("d/") for r in first)
    # The planner sorts ids and shards re-load each clip from its locator alone.
    config = RunConfig(sources=[source], output={"shard_size": 2})  # type: ignore[arg-type]
    store = LocalStore(tmp_path / "out")
    plan = plan_run(config, store, "d/_staging/r", "r")
    refs = [r for i in range(plan.shards) for r in load_shard_plan(store, "d/_staging/r", i).refs]
    assert [r.id for r in refs] == sorted(r.id for r in first)
    assert {r.id: load_clip(r, [source]).model_dump() for r in refs} == \
        {r.id: load_clip(r, [source]).model_dump() for r in first}
    fingerprint = source_fingerprint([source])
    assert fingerprint == source_fingerprint([source])


MISSING_METADATA = {
    "librispeech": ("SPEAKERS.TXT", "SPEAKERS.TXT: missing speaker list"),
    "libritts": ("speakers.tsv", "speakers.tsv: missing speaker list"),
    "vctk": ("speaker-info.txt", "speaker-info.txt: missing VCTK speaker list; it ships at the top"),
    "commonvoice": ("validated.tsv", "validated.tsv: missing Common Voice index"),
    "cremad": ("VideoDemographics.csv", "VideoDemographics.csv: missing CREMA-D speaker demographics; it ships"),
    "esd": ("0011/0011.txt", "0011.txt: missing ESD transcript file"),
}


@pytest.mark.parametrize("kind", sorted(MISSING_METADATA))
def test_missing_metadata_file_is_a_clear_source_error(tmp_path: Path, kind: str) -> None:
    root = KIND_TREES[kind](tmp_path)
    rel, message = MISSING_METADATA[kind]
    (root / rel).unlink()
    if kind == "commonvoice":
        (root / "train.tsv").unlink()
    with pytest.raises(SourceError, match=message.replace(".", r"\.")) as info:
        ids_of(SourceConfig(kind=kind, path=str(root), dataset="d"))
    assert str(root) in str(info.value)
    assert any(fix in str(info.value) for fix in ("restore", "extract", "point sources[].path"))


def test_librispeech_chapter_without_transcript_file(tmp_path: Path) -> None:
    root = librispeech_tree(tmp_path)
    trans = root / "dev-clean" / "103" / "1240" / "103-1240.trans.txt"
    trans.unlink()
    with pytest.raises(SourceError, match="103-1240.trans.txt: missing chapter transcript file"):
        ids_of(SourceConfig(kind="librispeech", path=str(root), dataset="d"))


def test_wrong_layout_and_kind_mismatch_errors(tmp_path: Path) -> None:
    root = libritts_tree(tmp_path)
    with pytest.raises(SourceError, match="no LibriSpeech utterances .*for LibriTTS use kind: libritts"):
        ids_of(SourceConfig(kind="librispeech", path=str(root), dataset="d"))
    with pytest.raises(SourceError, match="kind 'vctk' needs the corpus folder"):
        ids_of(SourceConfig(kind="vctk", path=str(root / "speakers.tsv"), dataset="d"))
    # auto stays manifest/folder: a corpus folder is still a plain folder unless its kind is set.
    assert source_kind(SourceConfig(path=str(root))) == "folder"


def test_fingerprint_sees_metadata_edits(tmp_path: Path) -> None:
    root = vctk_tree(tmp_path)
    source = SourceConfig(kind="vctk", path=str(root), dataset="v")
    before = source_fingerprint([source])
    write(root / "speaker-info.txt", SPEAKER_INFO + "p999  30  M    Welsh    Cardiff\n")
    assert source_fingerprint([source]) != before
    # ...and the edited metadata is what the next load reads (caches are keyed by mtime and size).
    clips = clips_of(source)
    assert clips["v/p225_001"].labels["gender"] == "F"


@pytest.mark.s3
def test_hf_parquet_on_s3(tmp_path: Path, seaweedfs: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    root = hf_parquet_tree(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint_url)
    client = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region)
    prefix = f"adapters-{tmp_path.name}/data"
    for file in sorted(root.glob("*.parquet")):
        client.upload_file(str(file), seaweedfs.bucket, f"{prefix}/{file.name}")
    source = SourceConfig(kind="hf_parquet", path=f"s3://{seaweedfs.bucket}/{prefix}", dataset="hf")
    assert source_kind(source) == "hf_parquet"
    clips = clips_of(source)
    assert list(clips)[:3] == ["hf/utt-b", "hf/utt-a", "hf/train-00000-of-00001/000000"]
    third = clips["hf/train-00000-of-00001/000002"]
    assert third.audio_uri == f"s3://{seaweedfs.bucket}/{prefix}/train-00000-of-00001.parquet#row=2"
    assert third.audio_bytes == (SAMPLE_AUDIO / "cmu_goforward.flac").read_bytes()
    assert decodes(third) > 0.5
    assert source_fingerprint([source]) == source_fingerprint([source])
    with pytest.raises(SourceError, match=f"source s3://{seaweedfs.bucket}/vctk: nothing below this prefix"):
        source_kind(SourceConfig(kind="vctk", path=f"s3://{seaweedfs.bucket}/vctk"))  # s3:// works, if it holds a corpus
    with pytest.raises(SourceError, match="an http\\(s\\):// source must be a manifest"):
        source_kind(SourceConfig(kind="vctk", path="http://127.0.0.1:9/vctk"))
