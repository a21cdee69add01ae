"""Audio stored once on a real S3 server (SeaweedFS): a second run that changes only the LLM settings
writes no audio object, references the first run's audio files, and its rows, read through the
reader over S3 and verified, carry the same audio as the first version's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tasks.measure
from flows.generate import run_plain
from schemas.config import S3Config, parse_config
from storage.layout import audio_prefix
from storage.objectstore import open_store
from storage.reader import open_dataset
from storage.verify import verify_version
from tests.support.paths import SAMPLE_CORPUS
from tests.support.seaweedfs import SeaweedS3
from tests.support.stored import stored_rows


@pytest.mark.s3
def test_a_regeneration_on_s3_writes_no_audio_and_reads_the_same_audio(
        seaweedfs: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "clips"
    corpus.mkdir()
    for name in sorted(p.name for p in (SAMPLE_CORPUS / "audio").iterdir())[:4]:
        shutil.copy(SAMPLE_CORPUS / "audio" / name, corpus / name)
    root = seaweedfs.root(f"clip-cache-{tmp_path.name}")
    s3 = S3Config(endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region)

    def config(seed: int) -> dict[str, object]:
        return {"sources": [{"path": str(corpus), "dataset": "clips", "language": "en"}],
                "output": {"root": root, "dataset": "cc", "shard_size": 2},
                "s3": s3.model_dump(), "llm": {"backend": "rules", "seed": seed, "temperature": 0.1 * seed}}

    first = run_plain(parse_config(config(0), environ={}))
    store = open_store(root, s3)
    audio = {o.key: o.size for o in store.list_info(audio_prefix("cc"))}
    assert len([k for k in audio if k.endswith(".parquet")]) == len(first.shards) == 2

    decoded: list[str] = []
    real = tasks.measure.load_audio
    monkeypatch.setattr(tasks.measure, "load_audio", lambda clip, cfg: decoded.append(clip.id) or real(clip, cfg))
    second = run_plain(parse_config(config(3), environ={}))
    assert decoded == []
    assert {o.key: o.size for o in store.list_info(audio_prefix("cc"))} == audio
    assert [s.audio for s in second.shards] == [s.audio for s in first.shards]
    assert verify_version(store, "cc", second.lineage.version).ok
    want = stored_rows(store, first)
    got = open_dataset(f"{root}/cc", second.lineage.version, s3=s3).to_arrow(["id", "audio", "features"]).to_pylist()
    assert sorted(r["id"] for r in got) == sorted(want) and len(got) == 4
    for row in got:
        assert row["audio"]["bytes"] and row["audio"] == want[row["id"]]["audio"]
        assert row["features"] == want[row["id"]]["features"]
