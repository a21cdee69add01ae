"""Named corpus layouts, lhotse manifests and HF Parquet read from s3:// (issue 14 part 1) on a real SeaweedFS.

One bucket holds a LibriSpeech-style split (speaker/chapter/*.flac + *.trans.txt, SPEAKERS.TXT one level
above the split), a VCTK-style tree and a lhotse recordings + supervisions pair (gzipped, relative audio
paths); ingest (iter_refs → load_clip → load_audio) must give the corpus's ids, transcripts and speaker
labels, audio whose checksum equals the local file's, and a lhotse segment cut by range reads. Also: the
fingerprint follows one edited object, a chapter without its transcript file and a denied bucket fail
naming the URI and the fix/setting, an hf_parquet source uses the run's `s3` block (no AWS_ENDPOINT_URL
is set), a remote folder's plan counts its non-audio files, and one run reads the LibriSpeech split from
one bucket and writes its dataset to another.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from schemas.config import AudioConfig, RunConfig, load_config, parse_config
from storage.objectstore import open_store
from storage.reader import open_dataset
from storage.versions import read_manifest
from tasks.audio import load_audio
from tasks.ingest import SourceError, iter_refs, load_clip, source_fingerprint
from tasks.plan import count_skipped_files
from tests.support.paths import REPO, SAMPLE_CORPUS
from tests.support.seaweedfs import SeaweedS3

AUDIO = SAMPLE_CORPUS / "audio"
TEXT = {row["id"]: row.get("transcript") for row in (json.loads(line) for line in
        (SAMPLE_CORPUS / "manifest.jsonl").read_text().splitlines() if line.strip())}
# LibriSpeech utterance → sample clip it is made from (converted to FLAC, as LibriSpeech ships it).
LIBRI = {"1272-128104-0000": "librivox_ss01_0870", "1272-128104-0001": "librivox_ss01_0880",
         "2277-149896-0000": "arctic_slt_a0009"}
SPEAKERS_TXT = ";ID  |SEX| SUBSET    |MINUTES| NAME\n1272 | M | dev-clean | 25.02 | John Rose\n" \
               "2277 | F | dev-clean | 12.50 | Jane Doe\n"
VCTK_INFO = "ID  AGE  GENDER  ACCENTS  REGION COMMENTS\np225  23  F    English    Southern  England\n" \
            "p226  22  M    English    Surrey\n"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flac(src: Path, dst: Path) -> Path:
    data, rate = sf.read(src, dtype="int16")
    dst.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dst, data, rate, format="FLAC", subtype="PCM_16")
    return dst


def _gz_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.fixture()
def corpus(seaweedfs: SeaweedS3, tmp_path: Path) -> dict[str, Any]:
    """The corpora in one new bucket; `local` maps each uploaded key to the local file uploaded."""
    bucket = f"named-{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    client = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region)
    client.create_bucket(Bucket=bucket)
    local: dict[str, Path] = {}

    def upload(key: str, path: Path) -> None:
        client.upload_file(str(path), bucket, key)
        local[key] = path

    # LibriSpeech: LibriSpeech/SPEAKERS.TXT and the split dev-clean/<spk>/<chapter>/...
    client.put_object(Bucket=bucket, Key="LibriSpeech/SPEAKERS.TXT", Body=SPEAKERS_TXT.encode())
    chapters: dict[str, list[str]] = {}
    for utt, clip in LIBRI.items():
        spk, chapter, _ = utt.split("-")
        rel = f"{spk}/{chapter}/{utt}.flac"
        upload(f"LibriSpeech/dev-clean/{rel}", _flac(AUDIO / f"{clip}.wav", tmp_path / "libri" / rel))
        chapters.setdefault(f"{spk}/{chapter}/{spk}-{chapter}.trans.txt", []).append(f"{utt} {TEXT[clip].upper()}")
    for key, lines in chapters.items():
        client.put_object(Bucket=bucket, Key=f"LibriSpeech/dev-clean/{key}", Body="\n".join(lines).encode() + b"\n")
    # A chapter with audio but no transcript file, in another split.
    upload("LibriSpeech/broken/3000/15664/3000-15664-0000.flac", tmp_path / "libri" / "1272/128104/1272-128104-0000.flac")
    # VCTK 0.92: two mics of p225_001 (mic1 preferred), p226_002 without a transcript.
    client.put_object(Bucket=bucket, Key="vctk/speaker-info.txt", Body=VCTK_INFO.encode())
    upload("vctk/wav48_silence_trimmed/p225/p225_001_mic1.flac", AUDIO / "cmu_goforward.flac")
    upload("vctk/wav48_silence_trimmed/p225/p225_001_mic2.flac", AUDIO / "arctic_awb_a0007.flac")
    upload("vctk/wav48_silence_trimmed/p226/p226_002_mic1.flac", AUDIO / "arctic_awb_a0007.flac")
    client.put_object(Bucket=bucket, Key="vctk/txt/p225/p225_001.txt", Body=b"Please go forward.\n")
    # lhotse: recordings + supervisions (gzipped), audio paths relative to the manifests' folder.
    recordings, supervisions = [], []
    for rec_id, clip in (("rec-a", "librivox_ss01_0890"), ("rec-b", "cmu_cards_002")):
        upload(f"lhotse/audio/{clip}.wav", AUDIO / f"{clip}.wav")
        info = sf.info(AUDIO / f"{clip}.wav")
        recordings.append({"id": rec_id, "sources": [{"type": "file", "channels": [0], "source": f"audio/{clip}.wav"}],
                           "sampling_rate": info.samplerate, "num_samples": info.frames, "duration": info.duration,
                           "channel_ids": [0]})
    supervisions.append({"id": "sup-a", "recording_id": "rec-a", "start": 0.0, "duration": recordings[0]["duration"],
                         "channel": 0, "text": TEXT["librivox_ss01_0890"], "speaker": "ss01",
                         "custom": {"dialog_act": "statement"}})
    supervisions.append({"id": "sup-b", "recording_id": "rec-b", "start": 0.5, "duration": 1.0, "channel": 0,
                         "text": "part of it", "speaker": "cmu"})
    client.put_object(Bucket=bucket, Key="lhotse/recordings.jsonl.gz", Body=_gz_jsonl(recordings))
    client.put_object(Bucket=bucket, Key="lhotse/supervisions.jsonl.gz", Body=_gz_jsonl(supervisions))
    return {"bucket": bucket, "client": client, "local": local, "s3": f"s3://{bucket}"}


def _config(endpoint: str, **source: Any) -> RunConfig:
    return parse_config({"sources": [source], "s3": {"endpoint_url": endpoint}}, environ={})


def test_librispeech_split_on_s3(seaweedfs: SeaweedS3, corpus: dict[str, Any]) -> None:
    config = _config(seaweedfs.endpoint_url, kind="librispeech", path=f"{corpus['s3']}/LibriSpeech/dev-clean",
                     dataset="ls")
    refs = list(iter_refs(config.sources))
    assert [r.id for r in refs] == [f"ls/{utt}" for utt in LIBRI]
    clips = {r.id: load_clip(r, config.sources) for r in refs}
    for utt, sample in LIBRI.items():
        clip = clips[f"ls/{utt}"]
        spk, chapter, _ = utt.split("-")
        key = f"LibriSpeech/dev-clean/{spk}/{chapter}/{utt}.flac"
        assert clip.ingest_error is None and clip.audio_uri == f"{corpus['s3']}/{key}"
        assert clip.transcript == TEXT[sample].upper() and clip.language == "en"
        gender = "M" if spk == "1272" else "F"  # from SPEAKERS.TXT, one level above the split
        assert clip.labels == {"speaker": spk, "chapter": chapter, "gender": gender, "subset": "dev-clean"}
        decoded = load_audio(clip, AudioConfig())
        assert decoded.sha256 == _sha(corpus["local"][key]) and decoded.duration_s > 0.5
    before = source_fingerprint(config.sources)
    assert source_fingerprint(config.sources) == before
    corpus["client"].put_object(Bucket=corpus["bucket"], Key="LibriSpeech/dev-clean/2277/149896/2277-149896.trans.txt",
                                Body=b"2277-149896-0000 AN EDITED LINE\n")
    assert source_fingerprint(config.sources) != before  # one object's size/ETag changed
    edited = next(r for r in iter_refs(config.sources) if r.id == "ls/2277-149896-0000")
    assert load_clip(edited, config.sources).transcript == "AN EDITED LINE"  # metadata caches follow the ETag


def test_vctk_and_lhotse_on_s3(seaweedfs: SeaweedS3, corpus: dict[str, Any]) -> None:
    vctk = _config(seaweedfs.endpoint_url, kind="vctk", path=f"{corpus['s3']}/vctk", dataset="v")
    clips = {c.id: c for c in (load_clip(r, vctk.sources) for r in iter_refs(vctk.sources))}
    assert list(clips) == ["v/p225_001", "v/p226_002"]
    first, second = clips["v/p225_001"], clips["v/p226_002"]
    key = "vctk/wav48_silence_trimmed/p225/p225_001_mic1.flac"
    assert first.audio_uri == f"{corpus['s3']}/{key}" and first.transcript == "Please go forward."
    assert {k: first.labels[k] for k in ("speaker", "gender", "age", "region", "mic")} == {
        "speaker": "p225", "gender": "F", "age": "23", "region": "Southern England", "mic": "mic1"}
    assert second.transcript is None and second.labels["gender"] == "M"
    assert load_audio(first, AudioConfig()).sha256 == _sha(corpus["local"][key])

    lhotse = _config(seaweedfs.endpoint_url, kind="lhotse", path=f"{corpus['s3']}/lhotse", dataset="lh")
    refs = list(iter_refs(lhotse.sources))
    assert [r.id for r in refs] == ["lh/sup-a", "lh/sup-b"]
    whole, part = (load_clip(r, lhotse.sources) for r in refs)
    assert whole.audio_uri == f"{corpus['s3']}/lhotse/audio/librivox_ss01_0890.wav"  # relative to the manifest
    assert whole.audio_bytes is None and whole.transcript == TEXT["librivox_ss01_0890"]
    assert whole.labels["speaker"] == "ss01" and whole.labels["dialog_act"] == "statement"
    assert load_audio(whole, AudioConfig()).sha256 == _sha(AUDIO / "librivox_ss01_0890.wav")
    assert part.audio_uri == f"{corpus['s3']}/lhotse/audio/cmu_cards_002.wav#t=0.500,1.500"
    assert part.transcript == "part of it" and part.audio_bytes is not None
    cut, rate = sf.read(io.BytesIO(part.audio_bytes), dtype="float32")
    full, _ = sf.read(AUDIO / "cmu_cards_002.wav", dtype="float32")
    assert rate == 16000 and len(cut) == 16000  # one second, read by range requests
    assert np.allclose(cut, full[8000:24000], atol=1e-4)
    one_file = _config(seaweedfs.endpoint_url, path=f"{corpus['s3']}/lhotse/supervisions.jsonl.gz", dataset="lh")
    assert [r.id for r in iter_refs(one_file.sources)] == ["lh/sup-a", "lh/sup-b"]  # kind auto: a gzipped lhotse file
    before = source_fingerprint(one_file.sources)
    corpus["client"].put_object(Bucket=corpus["bucket"], Key="lhotse/supervisions.jsonl.gz", Body=_gz_jsonl([]))
    assert source_fingerprint(one_file.sources) != before


def test_missing_transcript_and_denied_bucket_name_uri_and_fix(seaweedfs: SeaweedS3, corpus: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _config(seaweedfs.endpoint_url, kind="librispeech", path=f"{corpus['s3']}/LibriSpeech/broken")
    with pytest.raises(SourceError) as missing:
        list(iter_refs(broken.sources))
    assert str(missing.value).startswith(
        f"{corpus['s3']}/LibriSpeech/broken/3000/15664/3000-15664.trans.txt: missing chapter transcript file; ")
    assert "use kind: folder" in str(missing.value)
    monkeypatch.setenv("CORPUS_KEY", "no-such-key")
    monkeypatch.setenv("CORPUS_SECRET", "sekrit-never-shown")
    path = f"{corpus['s3']}/vctk"
    denied = parse_config({"sources": [{"kind": "vctk", "path": path, "s3": {
        "endpoint_url": seaweedfs.endpoint_url, "access_key_id_env": "CORPUS_KEY",
        "secret_access_key_env": "CORPUS_SECRET"}}]}, environ={})
    with pytest.raises(SourceError) as refused:
        list(iter_refs(denied.sources))
    text = str(refused.value)
    assert text.startswith(f"source {path}: ") and "access denied" in text
    assert "$CORPUS_KEY / $CORPUS_SECRET (sources[0].s3)" in text and "sekrit-never-shown" not in text


def test_hf_parquet_uses_the_runs_s3_block_and_remote_folders_count_skipped_files(
        seaweedfs: SeaweedS3, corpus: dict[str, Any], tmp_path: Path) -> None:
    audio = (AUDIO / "cmu_goforward.flac").read_bytes()
    table = pa.table({"id": ["utt-1"], "text": ["go forward"],
                      "audio": [{"bytes": audio, "path": "cmu_goforward.flac"}]})
    pq.write_table(table, tmp_path / "train.parquet")
    corpus["client"].upload_file(str(tmp_path / "train.parquet"), corpus["bucket"], "hf/data/train.parquet")
    config = _config(seaweedfs.endpoint_url, kind="hf_parquet", path=f"{corpus['s3']}/hf/data", dataset="hf")
    (clip,) = (load_clip(r, config.sources) for r in iter_refs(config.sources))  # no AWS_ENDPOINT_URL is set
    assert clip.id == "hf/utt-1" and clip.transcript == "go forward" and clip.audio_bytes == audio
    assert source_fingerprint(config.sources) == source_fingerprint(config.sources)
    folder = _config(seaweedfs.endpoint_url, path=f"{corpus['s3']}/vctk")  # a plain folder source this time
    assert count_skipped_files(folder) == {}  # .txt files are sidecars, not skipped
    corpus["client"].put_object(Bucket=corpus["bucket"], Key="vctk/docs/README.pdf", Body=b"%PDF")
    corpus["client"].put_object(Bucket=corpus["bucket"], Key="vctk/docs/.hidden.pdf", Body=b"%PDF")
    assert count_skipped_files(folder) == {".pdf": 1}


@pytest.mark.usefixtures("prefect_harness")
def test_end_to_end_librispeech_from_one_bucket_to_another(seaweedfs: SeaweedS3, corpus: dict[str, Any]) -> None:
    from flows.generate import run_generate

    out_bucket = f"out-{corpus['bucket']}"
    corpus["client"].create_bucket(Bucket=out_bucket)
    root = f"s3://{out_bucket}/versions"
    config = load_config(REPO / "examples" / "quickstart.yaml", [
        f"output.root={root}", f"s3.endpoint_url={seaweedfs.endpoint_url}", f"s3.region={seaweedfs.region}",
        "s3.addressing_style=path", "sources.0.kind=librispeech", f"sources.0.path={corpus['s3']}/LibriSpeech/dev-clean",
        "sources.0.dataset=ls", "output.dataset=libri"], environ={})
    summary = run_generate(config)
    assert (summary.clips_in, summary.rows, summary.quarantined) == (3, 3, 0)
    rows = open_dataset(f"{root}/libri", s3=config.s3).to_arrow(
        columns=["id", "audio_uri", "transcript", "audio_sha256"]).to_pylist()
    assert sorted(rows, key=lambda r: r["id"]) == [
        {"id": f"ls/{utt}", "audio_uri": f"{corpus['s3']}/LibriSpeech/dev-clean/{utt.split('-')[0]}/"
                                         f"{utt.split('-')[1]}/{utt}.flac",
         "transcript": TEXT[sample].upper(),
         "audio_sha256": _sha(corpus["local"][f"LibriSpeech/dev-clean/{utt.split('-')[0]}/{utt.split('-')[1]}/{utt}.flac"])}
        for utt, sample in LIBRI.items()]
    assert read_manifest(open_store(root, config.s3), "libri", "v0001").stats.quarantine_by_reason == {}


def test_commonvoice_cremad_and_esd_on_s3(seaweedfs: SeaweedS3, corpus: dict[str, Any]) -> None:
    client, bucket = corpus["client"], corpus["bucket"]
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"
    rows = "c1\tcommon_voice_en_1.mp3\tThe first sentence.\t2\t0\ttwenties\tmale\tUS\ten\t\n" \
           "c2\tcommon_voice_en_2.mp3\tThe second one.\t3\t1\t\tfemale\t\ten\t\n"
    client.put_object(Bucket=bucket, Key="cv/en/validated.tsv", Body=(header + rows).encode())
    client.upload_file(str(AUDIO / "librivox_ss01_0930.mp3"), bucket, "cv/en/clips/common_voice_en_1.mp3")
    client.upload_file(str(AUDIO / "librivox_ss01_0930.mp3"), bucket, "cv/en/clips/common_voice_en_2.mp3")
    cv = _config(seaweedfs.endpoint_url, kind="commonvoice", path=f"{corpus['s3']}/cv/en", dataset="cv")
    clips = [load_clip(r, cv.sources) for r in iter_refs(cv.sources)]
    assert [(c.id, c.transcript, c.language) for c in clips] == [
        ("cv/common_voice_en_1", "The first sentence.", "en"), ("cv/common_voice_en_2", "The second one.", "en")]
    assert clips[0].audio_uri == f"{corpus['s3']}/cv/en/clips/common_voice_en_1.mp3"
    assert clips[0].labels["speaker"] == "c1" and clips[1].labels["gender"] == "female"
    assert load_audio(clips[1], AudioConfig()).sha256 == _sha(AUDIO / "librivox_ss01_0930.mp3")

    client.put_object(Bucket=bucket, Key="cremad/VideoDemographics.csv",
                      Body=b"ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n")
    client.upload_file(str(AUDIO / "arctic_slt_a0009.wav"), bucket, "cremad/AudioWAV/1001_DFA_ANG_XX.wav")
    cremad = _config(seaweedfs.endpoint_url, kind="cremad", path=f"{corpus['s3']}/cremad", dataset="cr")
    (clip,) = (load_clip(r, cremad.sources) for r in iter_refs(cremad.sources))
    assert (clip.id, clip.transcript) == ("cr/1001_DFA_ANG_XX", "Don't forget a jacket.")
    assert (clip.labels["emotion"], clip.labels["gender"], clip.labels["age"]) == ("ANG", "Male", "51")

    client.put_object(Bucket=bucket, Key="esd/0011/0011.txt", Body=b"0011_000001\tHello world\tNeutral\n")
    client.upload_file(str(AUDIO / "cmu_cards_002.wav"), bucket, "esd/0011/Neutral/0011_000001.wav")
    esd = _config(seaweedfs.endpoint_url, kind="esd", path=f"{corpus['s3']}/esd", dataset="esd")
    (clip,) = (load_clip(r, esd.sources) for r in iter_refs(esd.sources))
    assert (clip.id, clip.transcript, clip.language) == ("esd/0011_000001", "Hello world", "en")
    assert clip.labels == {"speaker": "0011", "emotion": "Neutral"}
    assert load_audio(clip, AudioConfig()).sha256 == _sha(AUDIO / "cmu_cards_002.wav")
