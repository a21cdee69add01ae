"""Corpora read where they live (issue 14 part 1): s3:// on a real SeaweedFS and http:// from a local
http.server, through ingest → load_clip → load_audio and one end-to-end run that writes to another bucket.

Checked: clip ids, audio URIs and transcripts of a remote manifest, a remote folder (with a sidecar)
and an HTTP manifest whose relative paths resolve against its own URL; the decoded audio's checksum
equals the local file's; the HTTP server sees one plain GET per clip and only range requests for the
manifest (no copy of the corpus); a missing object is a `missing_file` quarantine row naming its
URI; wrong credentials in a per-source override fail with the URI and the setting to check.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pyarrow.parquet as pq
import pytest

from schemas.config import AudioConfig, RunConfig, load_config, parse_config
from schemas.records import QuarantineError, ReasonCode
from storage.objectstore import open_store
from storage.reader import open_dataset
from storage.versions import file_key, read_manifest
from tasks.audio import load_audio
from tasks.ingest import SourceError, iter_refs, load_clip, source_fingerprint
from tests.support.http_files import RequestLog, serve_files
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3

SAMPLE = REPO / "examples" / "sample_corpus"
MANIFEST_ROWS = [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def corpus(seaweedfs: SeaweedS3, tmp_path: Path) -> dict[str, Any]:
    """One bucket holding the sample corpus three ways: a manifest corpus, a folder with a sidecar,
    and a manifest with one row whose object is missing."""
    bucket = f"corpus-{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    client = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region)
    client.create_bucket(Bucket=bucket)
    client.upload_file(str(SAMPLE / "manifest.jsonl"), bucket, "manifest-corpus/manifest.jsonl")
    for audio in sorted((SAMPLE / "audio").iterdir()):
        client.upload_file(str(audio), bucket, f"manifest-corpus/audio/{audio.name}")
    for name in ("arctic_slt_a0009.wav", "cmu_goforward.flac"):
        client.upload_file(str(SAMPLE / "audio" / name), bucket, f"folder-corpus/spk/{name}")
    client.put_object(Bucket=bucket, Key="folder-corpus/spk/cmu_goforward.txt", Body=b"go forward ten meters\n")
    client.put_object(Bucket=bucket, Key="folder-corpus/notes.pdf", Body=b"%PDF")
    rows = [{"id": "present", "path": "../manifest-corpus/audio/arctic_slt_a0009.wav", "transcript": "here"},
            {"id": "absent", "path": "audio/not_uploaded.wav", "transcript": "gone"}]
    client.put_object(Bucket=bucket, Key="holes/manifest.jsonl",
                      Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    return {"bucket": bucket, "client": client}


def _config(endpoint: str | None = None, **source: Any) -> RunConfig:
    """A run config for one source; `endpoint` goes into the run's `s3` block (which sources inherit)."""
    return parse_config({"sources": [source], "s3": {"endpoint_url": endpoint}}, environ={})


def test_s3_manifest_corpus_reads_per_clip(seaweedfs: SeaweedS3, corpus: dict[str, Any]) -> None:
    uri = f"s3://{corpus['bucket']}/manifest-corpus/manifest.jsonl"
    config = _config(path=uri, dataset="sample", s3={"endpoint_url": seaweedfs.endpoint_url})
    refs = list(iter_refs(config.sources))
    assert sorted(r.id for r in refs) == sorted(f"sample/{r['id']}" for r in MANIFEST_ROWS)
    by_id = {r.id: load_clip(r, config.sources) for r in refs}
    clip = by_id["sample/librivox_ss01_0880"]
    assert clip.audio_uri == f"s3://{corpus['bucket']}/manifest-corpus/audio/librivox_ss01_0880.wav"
    assert clip.transcript == "he was not an ill disposed young man" and clip.ingest_error is None
    assert clip.labels["speaker"] == "librivox_ss01"
    for clip_id in ("sample/librivox_ss01_0880", "sample/cmu_cards_005", "sample/arctic_awb_a0007"):
        decoded = load_audio(by_id[clip_id], AudioConfig())
        local = SAMPLE / "audio" / by_id[clip_id].audio_uri.rsplit("/", 1)[-1]
        assert decoded.sha256 == _sha(local) and decoded.sampling_rate == 16000 and decoded.duration_s > 0.5
    before = source_fingerprint(config.sources)
    assert before == source_fingerprint(config.sources)
    corpus["client"].put_object(Bucket=corpus["bucket"], Key="manifest-corpus/manifest.jsonl",
                                Body=(SAMPLE / "manifest.jsonl").read_bytes() + b"\n")
    assert source_fingerprint(config.sources) != before  # a changed manifest (size, ETag) is a new corpus


def test_s3_folder_corpus_lists_and_reads_sidecars(seaweedfs: SeaweedS3, corpus: dict[str, Any]) -> None:
    config = _config(seaweedfs.endpoint_url, path=f"s3://{corpus['bucket']}/folder-corpus", language="en")
    refs = list(iter_refs(config.sources))
    assert [r.id for r in refs] == ["folder-corpus/spk/arctic_slt_a0009", "folder-corpus/spk/cmu_goforward"]
    clips = [load_clip(r, config.sources) for r in refs]
    assert clips[1].audio_uri == f"s3://{corpus['bucket']}/folder-corpus/spk/cmu_goforward.flac"
    assert (clips[0].transcript, clips[1].transcript) == (None, "go forward ten meters")
    assert clips[1].language == "en"
    assert load_audio(clips[1], AudioConfig()).sha256 == _sha(SAMPLE / "audio" / "cmu_goforward.flac")


def test_missing_object_is_a_quarantine_reason_naming_the_uri(seaweedfs: SeaweedS3, corpus: dict[str, Any]) -> None:
    config = _config(seaweedfs.endpoint_url, path=f"s3://{corpus['bucket']}/holes/manifest.jsonl",
                     allowed_roots=[f"s3://{corpus['bucket']}/manifest-corpus"])
    clips = {c.id: c for c in (load_clip(r, config.sources) for r in iter_refs(config.sources))}
    present = clips["holes/present"]  # `..` resolved against the manifest's own URI, inside allowed_roots
    assert present.audio_uri == f"s3://{corpus['bucket']}/manifest-corpus/audio/arctic_slt_a0009.wav"
    assert load_audio(present, AudioConfig()).duration_s > 1
    with pytest.raises(QuarantineError) as missing:
        load_audio(clips["holes/absent"], AudioConfig())
    assert missing.value.reason == ReasonCode.missing_file
    assert f"s3://{corpus['bucket']}/holes/audio/not_uploaded.wav: no such object" in str(missing.value)
    confined = _config(seaweedfs.endpoint_url, path=f"s3://{corpus['bucket']}/holes/manifest.jsonl")  # no allowed_roots this time
    clip = next(load_clip(r, confined.sources) for r in iter_refs(confined.sources) if r.id == "holes/present")
    assert clip.ingest_error is not None and clip.ingest_error[0] == ReasonCode.path_outside_root
    assert "sources[0].allowed_roots" in clip.ingest_error[1]


def test_denied_bucket_names_the_uri_and_the_setting(seaweedfs: SeaweedS3, corpus: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORPUS_STORE_KEY", "no-such-key")
    monkeypatch.setenv("CORPUS_STORE_SECRET", "sekrit-value-never-printed")
    s3 = {"endpoint_url": seaweedfs.endpoint_url, "access_key_id_env": "CORPUS_STORE_KEY",
          "secret_access_key_env": "CORPUS_STORE_SECRET"}
    for path in (f"s3://{corpus['bucket']}/folder-corpus", f"s3://{corpus['bucket']}/manifest-corpus/manifest.jsonl"):
        config = _config(path=path, s3=s3)
        with pytest.raises(SourceError) as denied:
            list(iter_refs(config.sources))
        text = str(denied.value)
        assert f"source {path}" in text and "access denied" in text
        assert "$CORPUS_STORE_KEY / $CORPUS_STORE_SECRET (sources[0].s3)" in text
        assert "sekrit-value-never-printed" not in text


@pytest.fixture()
def http_corpus(tmp_path: Path) -> Iterator[tuple[str, RequestLog]]:
    root = tmp_path / "www"
    shutil.copytree(SAMPLE, root / "corpus")
    with serve_files(root) as served:
        yield served


def test_http_manifest_and_audio_are_read_per_clip(http_corpus: tuple[str, RequestLog]) -> None:
    base, log = http_corpus
    config = _config(path=f"{base}/corpus/manifest.jsonl", dataset="web")
    refs = list(iter_refs(config.sources))
    assert len(refs) == len(MANIFEST_ROWS)
    clip = load_clip(next(r for r in refs if r.id == "web/cmu_cards_002"), config.sources)
    assert clip.audio_uri == f"{base}/corpus/audio/cmu_cards_002.wav"  # relative to the manifest's URL
    assert clip.transcript == next(r["transcript"] for r in MANIFEST_ROWS if r["id"] == "cmu_cards_002")
    log.clear()
    decoded = load_audio(clip, AudioConfig())
    assert decoded.sha256 == _sha(SAMPLE / "audio" / "cmu_cards_002.wav")
    audio_gets = [entry for entry in log if entry[0] == "GET"]
    assert audio_gets == [("GET", "/corpus/audio/cmu_cards_002.wav", None)]  # one read of one clip
    manifest_reads = [e for e in log if e[1].endswith("manifest.jsonl")]
    assert not manifest_reads  # loading the clip's audio touched nothing else
    log.clear()
    load_clip(refs[3], config.sources)
    assert {e[0] for e in log} <= {"HEAD", "GET"} and all(e[2] for e in log if e[0] == "GET")  # rows by range
    assert all(e[1] == "/corpus/manifest.jsonl" for e in log)
    with pytest.raises(SourceError, match="must be a manifest"):
        list(iter_refs(_config(path=f"{base}/corpus/audio").sources))


@pytest.mark.usefixtures("prefect_harness")
def test_end_to_end_run_reads_s3_and_writes_another_bucket(seaweedfs: SeaweedS3, corpus: dict[str, Any],
                                                           tmp_path: Path) -> None:
    from flows.generate import run_generate

    out_bucket = f"out-{corpus['bucket']}"
    corpus["client"].create_bucket(Bucket=out_bucket)
    root = f"s3://{out_bucket}/versions"
    source_uri = f"s3://{corpus['bucket']}/holes/manifest.jsonl"
    config = load_config(REPO / "examples" / "quickstart.yaml", [
        f"output.root={root}", f"s3.endpoint_url={seaweedfs.endpoint_url}", f"s3.region={seaweedfs.region}",
        "s3.addressing_style=path", f"sources.0.path={source_uri}",
        f"sources.0.allowed_roots=[\"s3://{corpus['bucket']}/manifest-corpus\"]", "output.dataset=remote",
        "output.max_quarantine_ratio=0.6"], environ={})
    summary = run_generate(config)
    assert (summary.clips_in, summary.rows, summary.quarantined) == (2, 1, 1)
    rows = open_dataset(f"{root}/remote", s3=config.s3).to_arrow(
        columns=["id", "audio_uri", "transcript", "audio_sha256"]).to_pylist()
    assert rows == [{"id": "sample/present",
                     "audio_uri": f"s3://{corpus['bucket']}/manifest-corpus/audio/arctic_slt_a0009.wav",
                     "transcript": "here", "audio_sha256": _sha(SAMPLE / "audio" / "arctic_slt_a0009.wav")}]
    store = open_store(root, config.s3)
    manifest = read_manifest(store, "remote", "v0001")
    assert manifest.stats.quarantine_by_reason == {"missing_file": 1}
    local = tmp_path / "q.parquet"
    store.download_file(file_key(manifest, manifest.quarantine[0]), local)
    (quarantined,) = pq.read_table(local).to_pylist()
    assert quarantined["reason_code"] == "missing_file"
    assert quarantined["audio_uri"] == f"s3://{corpus['bucket']}/holes/audio/not_uploaded.wav"
    assert "no such object" in quarantined["message"]
