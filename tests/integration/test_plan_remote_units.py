"""Planning by recording on s3:// (SeaweedFS) and http:// (a local Range server): the same weights and
shards as the same files read locally, sizes from the listing (s3) or a HEAD (http), and at most one
64 KiB range GET per file past the size floor: short clips and MP3s are never read, nothing whole."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import boto3
import numpy as np
import pytest
import soundfile as sf

from schemas.config import RunConfig, parse_config
from storage import sources as stores
from storage.objectstore import LocalStore
from tasks.ingest import iter_refs, source_kind
from tasks.plan import audio_units, load_shard_plan, plan_run
from tasks.segment.blocks import HEADER_WINDOW_BYTES
from tests.support.http_files import serve_files
from tests.support.paths import SAMPLE_CORPUS
from tests.support.seaweedfs import SeaweedS3
from tests.support.speech import load_16k, trim_quiet

RATE = 8000
CAP = 10.0
LONG = {"rec600.wav": 600.0, "talk.flac": 120.0, "talk.mp3": 90.0}  # past the floor
SHORT = {"a.wav": 2.0, "b.wav": 1.5, "c.wav": 2.0}  # under the 40 kB WAV floor: never read
Reads = list[tuple[str, int, int]]


def speech(seconds: float) -> np.ndarray:
    clips = [trim_quiet(load_16k(p))[::2] for p in sorted((SAMPLE_CORPUS / "audio").glob("*.wav"))]
    pause = np.zeros(int(0.4 * RATE), np.float32)
    total = np.concatenate([x for c in clips for x in (c, pause)])
    return np.resize(total, round(seconds * RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("ffmpeg is needed (apt-get install ffmpeg)")
    root = tmp_path_factory.mktemp("planunits")
    for name, seconds in {**LONG, **SHORT}.items():
        if name.endswith(".mp3"):
            sf.write(root / "tmp.wav", speech(seconds), RATE, subtype="PCM_16")
            subprocess.run([ffmpeg, "-v", "error", "-i", str(root / "tmp.wav"), "-b:a", "64k", str(root / name)],
                           check=True)
            (root / "tmp.wav").unlink()
        else:
            sf.write(root / name, speech(seconds), RATE, subtype="PCM_16")
    rows = [{"id": Path(n).stem + Path(n).suffix.replace(".", "_"), "path": n} for n in sorted({**LONG, **SHORT})]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture()
def bucket(seaweedfs: SeaweedS3, corpus: Path, tmp_path: Path) -> str:
    name = f"plan-{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    client = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url, region_name=seaweedfs.region)
    client.create_bucket(Bucket=name)
    for path in corpus.iterdir():
        client.upload_file(str(path), name, f"talks/{path.name}")
    return f"s3://{name}/talks"


def config_for(path: str, seaweedfs: SeaweedS3 | None = None, **extra: object) -> RunConfig:
    s3 = {"s3": {"endpoint_url": seaweedfs.endpoint_url, "region": seaweedfs.region,
                 "addressing_style": "path"}} if seaweedfs else {}
    return parse_config({"sources": [{"path": path, "dataset": "t"}], "output": {"shard_size": 6},
                         "audio": {"max_duration_s": CAP}, **s3, **extra}, environ={})


def measure_reads(monkeypatch: pytest.MonkeyPatch, config: RunConfig) -> Reads:
    source_kind(config.sources[0], 0)  # registers the source's store
    store = stores.store_for(config.sources[0].path)
    reads: Reads = []
    original = store.read

    def read(u: str, start: int | None = None, end: int | None = None, max_bytes: int | None = None) -> bytes:
        reads.append((u, -1 if start is None else start, -1 if end is None else end))
        return original(u, start, end, max_bytes)

    monkeypatch.setattr(store, "read", read)
    return reads


def plan_of(config: RunConfig, tmp: Path, run: str) -> tuple[dict[tuple[int, str], float], list[list[str]], int]:
    units = audio_units(config, [(r.source, r.locator) for r in iter_refs(config.sources)])
    store = LocalStore(tmp / "store")
    plan = plan_run(config, store, f"t/_staging/{run}", run)
    shards = [[r.id for r in load_shard_plan(store, f"t/_staging/{run}", i).refs] for i in range(plan.shards)]
    return units, shards, plan.long_recordings


def assert_balanced(units: dict[tuple[int, str], float], local_units: dict[tuple[int, str], float]) -> None:
    assert units == local_units
    mp3, flac, wav = sorted(units.values())  # weights of the three recordings, in units of CAP
    assert (flac, wav) == (pytest.approx(12.0), pytest.approx(60.0))  # their headers
    assert mp3 == pytest.approx(9.0, rel=0.05)  # bytes / 8000 of a 64 kbit/s MP3


def test_s3_folder_and_manifest_plan_as_local_with_header_range_reads_only(
        seaweedfs: SeaweedS3, bucket: str, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kind, local_path, remote_path in (("folder", str(corpus), bucket),
                                          ("manifest", str(corpus / "manifest.jsonl"), f"{bucket}/manifest.jsonl")):
        local = plan_of(config_for(local_path), tmp_path / kind / "l", "l")
        config = config_for(remote_path, seaweedfs)
        reads = measure_reads(monkeypatch, config)
        remote = plan_of(config, tmp_path / kind / "r", "r")
        assert remote == local and local[2] == 3
        assert_balanced(remote[0], local[0])
        assert any(len(shard) == 1 and shard[0].startswith("t/rec600") for shard in remote[1])  # alone
        audio = [r for r in reads if not r[0].endswith(".jsonl")]
        assert all(end - start == HEADER_WINDOW_BYTES for _, start, end in audio)  # ranges only, 64 KiB
        names = [u.rsplit("/", 1)[-1] for u, _, _ in audio]
        # One header GET per WAV/FLAC past the floor per pass (audio_units, then plan_run); never a short clip or MP3.
        assert sorted(set(names)) == ["rec600.wav", "talk.flac"] and len(names) == 4


def test_http_manifest_is_weighed_by_head_and_one_ranged_get(corpus: Path, tmp_path: Path) -> None:
    local = plan_of(config_for(str(corpus / "manifest.jsonl")), tmp_path / "l", "l")
    with serve_files(corpus) as (base, log):
        config = config_for(f"{base}/manifest.jsonl")
        log.clear()
        units = audio_units(config, [(r.source, r.locator) for r in iter_refs(config.sources)])
    assert_balanced(units, local[0])
    audio = [e for e in log if not e[1].endswith(".jsonl")]
    gets = [e for e in audio if e[0] == "GET"]
    assert all(e[2] == f"bytes=0-{HEADER_WINDOW_BYTES - 1}" for e in gets)  # no whole-object GET
    assert sorted(e[1] for e in gets) == ["/rec600.wav", "/talk.flac"]  # one per header past the floor
    heads = [e[1] for e in audio if e[0] == "HEAD"]
    assert sorted(heads) == sorted(f"/{n}" for n in {**LONG, **SHORT})  # one size each
    assert all(e[0] in ("GET", "HEAD") for e in log)


def test_segment_never_on_s3_reads_no_audio_and_plans_by_count(
        seaweedfs: SeaweedS3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for(bucket, seaweedfs, segment={"mode": "never"})
    reads = measure_reads(monkeypatch, config)
    units, shards, long = plan_of(config, tmp_path, "n")
    assert units == {} and long == 0 and [len(s) for s in shards] == [6]
    assert reads == []
