"""Long recordings read where they live (issue 14 parts 1, 2, 4): s3:// on SeaweedFS and http://
from a local http.server, cut into the very segments of the same file read locally.

A ~80 s recording (espeak-ng sentences and real sample clips with known silences, 16 kHz 16-bit WAV,
~2.6 MB) is uploaded as WAV and as MP3. Checked: the header says the local duration; the segment
ids equal the local file's; each segment's samples equal the local read's (WAV exactly, MP3 within
1e-4); the bytes the source store reads are measured by wrapping its `read` method (the data is
real): every read is a range of at most REMOTE_BUFFER_BYTES, streaming the blocks reads each byte
about once, and a header is one 64 KiB read and one segment reads far less than the object. Under `segment: auto` an
s3 manifest's long recording is cut from its header (the clips equal the local manifest's, audio
bytes included) while a short clip stays whole; the size cap is checked by stat before any read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import soundfile as sf

from schemas.config import RunConfig, S3Config, SegmentConfig, parse_config
from schemas.records import QuarantineError, ReasonCode
from storage import sources as stores
from tasks.ingest import iter_refs
from tasks.segment import read_segment, recording_info, segment_recording
from tasks.segment.blocks import HEADER_WINDOW_BYTES, REMOTE_BUFFER_BYTES
from tasks.segment.clips import shard_clips
from tasks.tally import ShardTally
from tests.support.http_files import RequestLog, serve_files
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3
from tests.support.speech import SENTENCES, SR, load_16k, trim_quiet

SAMPLES = REPO / "examples" / "sample_corpus"
SEGMENT = SegmentConfig(vad="energy", min_s=2.0, max_s=20.0, min_silence_s=0.3)
Reads = list[tuple[int, int, int]]  # (start, end, bytes returned) of each store read


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """rec.wav (~80 s, utterances in a seeded order, 0.8-1.6 s silences), rec.mp3, short.wav."""
    espeak, ffmpeg = shutil.which("espeak-ng"), shutil.which("ffmpeg")
    if espeak is None or ffmpeg is None:
        pytest.skip("espeak-ng and ffmpeg are needed (apt-get install espeak-ng ffmpeg)")
    root = tmp_path_factory.mktemp("longremote")
    pieces = []
    for i, text in enumerate(SENTENCES):
        subprocess.run([espeak, "-w", str(root / f"s{i}.wav"), "-s", "160", text], check=True, capture_output=True)
        pieces.append(trim_quiet(load_16k(root / f"s{i}.wav")))
    pieces += [trim_quiet(load_16k(p)) for p in sorted((SAMPLES / "audio").glob("*.wav"))[:4]]
    rng = np.random.default_rng(14)
    parts, t = [np.zeros(SR // 2, np.float32)], SR // 2
    while t < 80 * SR:
        audio = pieces[int(rng.integers(len(pieces)))] * rng.uniform(0.6, 1.0)
        gap = np.zeros(int(rng.uniform(0.8, 1.6) * SR), np.float32)
        parts += [audio.astype(np.float32), gap]
        t += len(audio) + len(gap)
    sf.write(root / "rec.wav", np.clip(np.concatenate(parts), -1, 1), SR, subtype="PCM_16")
    subprocess.run([ffmpeg, "-v", "error", "-i", str(root / "rec.wav"), "-b:a", "64k", str(root / "rec.mp3")],
                   check=True)
    shutil.copy(SAMPLES / "audio" / "arctic_slt_a0009.wav", root / "short.wav")
    rows = [{"id": "rec", "path": "rec.wav"}, {"id": "short", "path": "short.wav", "transcript": "he turned"}]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"wav": root / "rec.wav", "mp3": root / "rec.mp3", "short": root / "short.wav",
            "manifest": root / "manifest.jsonl"}


@pytest.fixture()
def bucket(seaweedfs: SeaweedS3, recording: dict[str, Path], tmp_path: Path) -> str:
    """A fresh bucket holding the recording files, its s3:// prefix registered with the SeaweedFS store."""
    name = f"long-{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    client = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region)
    client.create_bucket(Bucket=name)
    for path in recording.values():
        client.upload_file(str(path), name, f"talks/{path.name}")
    s3 = S3Config(endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region, addressing_style="path")
    stores.register(f"s3://{name}", stores.source_store(f"s3://{name}", s3))
    return f"s3://{name}/talks"


def measure_reads(monkeypatch: pytest.MonkeyPatch, uri: str) -> Reads:
    """Every read of `uri`'s store from now on, as (start, end, bytes); the bytes are the real ones."""
    store = stores.store_for(uri)
    reads: Reads = []
    original = store.read

    def read(u: str, start: int | None = None, end: int | None = None, max_bytes: int | None = None) -> bytes:
        data = original(u, start, end, max_bytes)
        reads.append((-1 if start is None else start, -1 if end is None else end, len(data)))
        return data

    monkeypatch.setattr(store, "read", read)
    return reads


def assert_same_segmentation(local: Path, remote: str, atol: float) -> list[Any]:
    mine = segment_recording(str(local), "rec", SEGMENT)
    theirs = segment_recording(remote, "rec", SEGMENT)
    assert len(mine) >= 4 and [s.id for s in theirs] == [s.id for s in mine]
    for seg in mine[:3] + mine[-2:]:
        here, there = read_segment(str(local), seg.start_s, seg.end_s), read_segment(remote, seg.start_s, seg.end_s)
        assert len(there) == len(here) == round((seg.end_s - seg.start_s) * SR)
        np.testing.assert_allclose(there, here, atol=atol, rtol=0)
    return mine


def test_s3_wav_is_segmented_by_range_reads(bucket: str, recording: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    uri, size = f"{bucket}/rec.wav", recording["wav"].stat().st_size
    assert size > 2 * REMOTE_BUFFER_BYTES
    reads = measure_reads(monkeypatch, uri)
    info = recording_info(uri)
    assert info == recording_info(str(recording["wav"])) and info.reader == "soundfile" and info.duration_s > 75
    assert reads == [(0, HEADER_WINDOW_BYTES, HEADER_WINDOW_BYTES)]  # the header: one 64 KiB range read
    segments = assert_same_segmentation(recording["wav"], uri, atol=0.0)
    assert all(0 <= start < end and end - start <= REMOTE_BUFFER_BYTES for start, end, _ in reads)  # ranges only
    reads.clear()
    segment_recording(uri, "rec", SEGMENT)
    streamed = sum(r[2] for r in reads)
    assert size <= streamed <= size + 2 * REMOTE_BUFFER_BYTES and len(reads) <= size // REMOTE_BUFFER_BYTES + 4
    seg = segments[len(segments) // 2]
    reads.clear()
    read_segment(uri, seg.start_s, seg.end_s)
    span_bytes = (seg.end_s - seg.start_s) * SR * 2
    assert sum(r[2] for r in reads) <= span_bytes + 2 * REMOTE_BUFFER_BYTES < size  # a seek, not the whole object


def test_s3_mp3_streams_through_ffmpeg_with_the_same_segments(bucket: str, recording: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"{bucket}/rec.mp3"
    reads = measure_reads(monkeypatch, uri)
    info = recording_info(uri)
    assert info.reader == "ffmpeg" and info.duration_s == pytest.approx(recording_info(str(recording["mp3"])).duration_s)
    assert_same_segmentation(recording["mp3"], uri, atol=1e-4)
    assert reads and all(0 <= start < end for start, end, _ in reads)  # ffmpeg's reads: range reads via the relay


def test_auto_mode_cuts_a_long_s3_recording_from_its_header(seaweedfs: SeaweedS3, bucket: str,
                                                            recording: dict[str, Path]) -> None:
    s3 = {"endpoint_url": seaweedfs.endpoint_url, "region": seaweedfs.region, "addressing_style": "path"}

    def clips(manifest: str, **audio: Any) -> tuple[list[Any], ShardTally]:
        config: RunConfig = parse_config({"sources": [{"path": manifest, "dataset": "d"}], "audio": audio, "s3": s3,
                                          "segment": SEGMENT.model_dump(exclude={"mode"}) | {"mode": "auto"}},
                                         environ={})
        acc = ShardTally()
        return list(shard_clips(sorted(iter_refs(config.sources), key=lambda r: r.id), config, acc)), acc

    local, _ = clips(str(recording["manifest"]))
    remote, acc = clips(f"{bucket}/manifest.jsonl")
    assert [c.id for c in remote] == [c.id for c in local] and remote[-1].id == "d/short"
    assert len(remote) >= 5 and all(c.id.startswith("d/rec@") for c in remote[:-1])
    assert all(c.audio_uri == f"{bucket}/rec.wav" for c in remote[:-1]) and remote[-1].audio_bytes is None
    assert [c.audio_bytes for c in remote] == [c.audio_bytes for c in local]  # the same samples, as WAV
    assert (acc.recordings_cut, acc.refs_done) == (1, 2)
    capped, acc = clips(f"{bucket}/manifest.jsonl", max_file_bytes=1_000_000)  # stat says too large: not read
    assert [c.id for c in capped] == ["d/rec", "d/short"] and acc.recordings_cut == 0
    with pytest.raises(QuarantineError) as err:
        segment_recording(f"{bucket}/rec.wav", "rec", SEGMENT, max_bytes=1_000_000)
    assert err.value.reason is ReasonCode.too_large and "audio.max_file_bytes" in err.value.message
    with pytest.raises(QuarantineError) as missing:
        recording_info(f"{bucket}/nothing.wav")
    assert missing.value.reason is ReasonCode.missing_file and f"{bucket}/nothing.wav" in missing.value.message


@pytest.fixture()
def http_root(recording: dict[str, Path]) -> Iterator[tuple[str, RequestLog]]:
    with serve_files(recording["wav"].parent) as served:
        yield served


def test_http_wav_and_mp3_give_the_local_segments(http_root: tuple[str, RequestLog],
                                                  recording: dict[str, Path]) -> None:
    base, log = http_root
    assert_same_segmentation(recording["wav"], f"{base}/rec.wav", atol=0.0)
    gets = [e for e in log if e[0] == "GET"]
    assert gets and all(e[1] == "/rec.wav" and e[2] for e in gets)  # every GET a Range request
    log.clear()
    assert_same_segmentation(recording["mp3"], f"{base}/rec.mp3", atol=1e-4)
    assert all(e[2] for e in log if e[0] == "GET")
