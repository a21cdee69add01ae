"""Audio stored once (issue 15 part 2): a run that changes only the LLM or the describe settings reuses
the first run's audio files and measurements through the clip cache.

Real runs (`run_plain`, the `rules` backend) over the sample corpus plus one unreadable file: the
second run must write no object under `<dataset>/audio/`, never decode, measure or cut a clip (the
decode, DSP and segmenting functions are counted), reference the same audio files, and still give
rows whose audio, features and transcripts equal the first run's (read through the reader and
straight from the files), the same quarantine, and the same stats. A changed measuring setting
measures again; a shard whose measuring hit a transient failure writes no cache index.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

import tasks.measure
import tasks.segment.clips
from flows.generate import run_plain
from schemas.config import RunConfig, parse_config
from schemas.manifest import Manifest
from schemas.records import QuarantineError, ReasonCode, Stage
from storage.layout import audio_prefix
from storage.objectstore import open_store
from storage.reader import open_dataset
from tests.support.longform import build_recording
from tests.support.paths import SAMPLE_CORPUS
from tests.support.speech import SENTENCES, trim_quiet
from tests.support.stored import stored_rows

SAME = ("audio_sha256", "duration_s", "audio_offset_s", "transcript", "transcript_source", "features",
        "labels", "attributes")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, espeak: Callable[..., np.ndarray]) -> Path:
    """clips/: five sample clips and one file that is not audio; talks/: one recording cut into segments."""
    root = tmp_path_factory.mktemp("clip_cache")
    (root / "clips").mkdir()
    for name in sorted(p.name for p in (SAMPLE_CORPUS / "audio").iterdir())[:5]:
        shutil.copy(SAMPLE_CORPUS / "audio" / name, root / "clips" / name)
    (root / "clips" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    sentences = [(trim_quiet(espeak("-s", "170", text=text)), text) for text in SENTENCES[:3]]
    build_recording(root / "talks" / "rec.wav", sentences, seed=5, seconds=10)
    return root


def _config(corpus: Path, out: Path, *, llm_seed: int = 0, describe: dict[str, Any] | None = None,
            **features: Any) -> RunConfig:
    return parse_config({
        "sources": [{"path": str(corpus / "clips"), "dataset": "clips", "language": "en"},
                    {"path": str(corpus / "talks"), "dataset": "talks", "language": "en",
                     "segment": {"mode": "always"}}],
        "output": {"root": str(out), "dataset": "cc", "shard_size": 3, "max_quarantine_ratio": 1.0},
        "segment": {"min_s": 1.0, "max_s": 6.0, "vad": "energy", "min_silence_s": 0.3},
        "features": features,
        "describe": describe or {},
        "llm": {"backend": "rules", "seed": llm_seed},
    })


def _audio_objects(out: Path) -> dict[str, int]:
    store = open_store(str(out))
    return {o.key: o.size for o in store.list_info(audio_prefix("cc"))}


class Counted:
    """Counts calls of the functions that decode, measure and cut clips (wrapping the real ones)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, int] = {}
        for module, name in ((tasks.measure, "load_audio"), (tasks.measure, "extract_features"),
                             (tasks.segment.clips, "segment_recording")):
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)
        return counted


def _quarantine(out: Path, manifest: Manifest) -> list[tuple[str, str]]:
    from storage.versions import file_key

    return sorted((r["id"], r["reason_code"]) for part in manifest.quarantine
                  for r in pq.read_table(out / file_key(manifest, part)).to_pylist())


@pytest.fixture(scope="module")
def first(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("out")
    manifest = run_plain(_config(corpus, out))
    return {"out": out, "manifest": manifest, "audio": _audio_objects(out)}


def test_a_run_changing_only_llm_and_describe_reuses_audio_and_measures_nothing(
        corpus: Path, first: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    out, m1 = first["out"], first["manifest"]
    assert m1.stats.rows >= 6 and m1.stats.recordings_cut == 1 and m1.stats.segments >= 2
    assert all(s.audio is not None for s in m1.shards)
    assert first["audio"] and any(k.endswith(".json") for k in first["audio"])
    counted = Counted(monkeypatch)
    m2 = run_plain(_config(corpus, out, llm_seed=7, describe={"instruction": "Describe the voice you hear.",
                                                                "format": "desta2"}))
    assert m2.lineage.version != m1.lineage.version and m2.lineage.run_id != m1.lineage.run_id
    assert counted.calls == {}  # nothing decoded, measured or cut again
    assert _audio_objects(out) == first["audio"]  # no audio byte written again
    assert [s.audio for s in m2.shards] == [s.audio for s in m1.shards]
    for s in m2.shards:  # the row shards carry names, not bytes
        audio = pq.read_table(out / s.path, columns=["audio"]).column("audio").combine_chunks()
        assert audio.field("bytes").null_count == s.rows
    for key in ("clips_in", "rows", "quarantined", "recordings_cut", "segments", "audio_hours"):
        assert getattr(m2.stats, key) == getattr(m1.stats, key), key
    assert _quarantine(out, m2) == _quarantine(out, m1)
    assert ("clips/broken", "unreadable") in _quarantine(out, m2)  # replayed from the cache index
    # The reader joins the same audio back; values equal the first run's, read straight from the files.
    store = open_store(str(out))
    want = stored_rows(store, m1)
    got = {r["id"]: r for r in open_dataset(f"{out}/cc", m2.lineage.version).to_arrow().to_pylist()}
    assert set(got) == set(want)
    for clip_id, row in got.items():
        assert row["audio"] == want[clip_id]["audio"] and row["audio"]["bytes"]
        for key in SAME:
            assert row[key] == want[clip_id][key], (clip_id, key)
    # Another instruction and seed format: describing and the LLM really ran again.
    assert all(got[i]["prompt"] == "Describe the voice you hear." != want[i]["prompt"] for i in got)
    assert all(got[i]["seed_description"] != want[i]["seed_description"] for i in got)


def test_a_changed_measuring_setting_measures_again(corpus: Path, first: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = first["out"]
    before = _audio_objects(out)
    counted = Counted(monkeypatch)
    m3 = run_plain(_config(corpus, out, phoneme_rate=not _config(corpus, out).features.phoneme_rate))
    assert counted.calls.get("load_audio", 0) >= 5 and counted.calls.get("segment_recording") == 1
    new = set(_audio_objects(out)) - set(before)
    assert {s.audio.path for s in m3.shards if s.audio} <= new


def test_a_transient_failure_while_measuring_leaves_no_cache_index(corpus: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = tasks.measure.load_audio

    def flaky(clip: Any, config: Any) -> Any:
        if clip.id.endswith("arctic_awb_a0007"):
            raise QuarantineError(Stage.audio, ReasonCode.storage_error, "the store said 503")
        return real(clip, config)

    monkeypatch.setattr(tasks.measure, "load_audio", flaky)
    config = _config(corpus, tmp_path)
    with pytest.raises(Exception, match="storage_error"):  # the commit gate refuses a transient failure
        run_plain(config)
    objects = _audio_objects(tmp_path)
    parquet = {k.removesuffix(".parquet").rsplit("-", 1)[0] for k in objects if k.endswith(".parquet")}
    indexes = {k.removesuffix(".json") for k in objects if k.endswith(".json")}
    assert len(parquet) >= 2 and len(indexes) == len(parquet) - 1  # the failed shard's measuring is not kept
    monkeypatch.setattr(tasks.measure, "load_audio", real)
    counted = Counted(monkeypatch)
    manifest = run_plain(config)  # the re-run measures that shard again and commits
    assert counted.calls.get("load_audio") == 3 and manifest.stats.quarantined == 1
