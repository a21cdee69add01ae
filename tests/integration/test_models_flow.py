"""Whisper and classifiers inside the real pipeline: tiny random-weight models built here, loaded by path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from flows.generate import run_plain
from schemas.records import QuarantineError, ReasonCode, Stage
from storage.objectstore import open_store
from storage.versions import file_key, read_manifest
from tests.support.datasets_support import quarantine_rows, sample_config
from tests.support.paths import REPO

pytest.importorskip("whisper")
pytest.importorskip("transformers")

EMOTIONS = ["ang", "hap", "neu", "sad"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.tiny_models import build_micro_whisper, build_tiny_audio_classifier

    root = tmp_path_factory.mktemp("models")
    return {"whisper": build_micro_whisper(root / "micro-whisper.pt"),
            "emotion": build_tiny_audio_classifier(root / "emotion", EMOTIONS)}


def _overrides(models: dict[str, Path]) -> list[str]:
    return ["features.asr.enabled=true", f"features.asr.model={models['whisper']}", "features.asr.device=cpu",
            "features.asr.no_speech_threshold=1.0", "features.asr.logprob_threshold=-1000",
            "features.asr.compression_ratio_threshold=1000",
            (f'features.classifiers=[{{attribute: emotion, model: "{models["emotion"]}", device: cpu, '
             'min_score: 0.0, label_map: {ang: angry, hap: happy, neu: neutral, sad: sad}}]')]


def _rows(root: Path, dataset: str, version: str) -> dict[str, dict[str, Any]]:
    store = open_store(str(root))
    manifest = read_manifest(store, dataset, version)
    out: dict[str, dict[str, Any]] = {}
    for shard in manifest.shards:
        for row in pq.read_table(root / file_key(manifest, shard)).to_pylist():
            out[row["id"].split("/", 1)[1]] = row
    return out


def test_whisper_and_classifier_fill_the_seed(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    config = sample_config(str(tmp_path / "out"), "models", workdir=tmp_path, overrides=_overrides(tiny_models))
    manifest = run_plain(config)
    assert manifest.stats.rows == 10
    roles = {m.role: m.name for m in manifest.lineage.models}
    assert roles["asr"].startswith("whisper:") and str(tiny_models["whisper"]) in roles["asr"]
    assert roles["emotion"] == str(tiny_models["emotion"])
    rows = _rows(tmp_path / "out", "models", manifest.lineage.version)
    awb = rows["arctic_awb_a0007"]  # the one clip without a corpus transcript
    assert awb["features"]["asr_avg_logprob"] is not None and awb["language"]
    assert awb["transcript_source"] in (None, roles["asr"])
    assert all(r["features"]["asr_avg_logprob"] is None for k, r in rows.items() if k != "arctic_awb_a0007")
    assert all(r["transcript_source"] == "corpus" for k, r in rows.items() if k != "arctic_awb_a0007")
    for row in rows.values():
        f = row["features"]
        assert f["emotion"] in {"angry", "happy", "neutral", "sad"}
        assert f["emotion_source"] == f"classifier:{tiny_models['emotion']}" and 0 <= f["emotion_score"] <= 1
        assert json.loads(row["attributes"])["Emotion"] == f["emotion"].capitalize()
        assert f"Emotion: {f['emotion'].capitalize()}" in row["seed_description"]
        assert json.loads(row["provenance"]["extractor_versions"])["classifier.emotion"] == str(tiny_models["emotion"])
    slt = rows["arctic_slt_a0009"]["features"]
    assert (slt["gender"], slt["gender_source"], slt["accent_source"]) == ("female", "corpus", "corpus")
    assert rows["librivox_ss01_0870"]["features"]["gender_source"] == "pitch_heuristic"
    assert rows["librivox_ss01_0870"]["features"]["speaking_rate_pps"] > 0


def test_a_failing_clip_is_quarantined_and_the_shard_goes_on(tiny_models: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.features.classifiers import AttributeClassifier

    original = AttributeClassifier.classify

    def fail_long_clips(self: AttributeClassifier, audios: Any) -> list[Any]:
        results = original(self, audios)
        return [QuarantineError(Stage.classify, ReasonCode.classifier_error, "emotion classifier: injected")
                if len(a) > 16000 * 6 else r for a, r in zip(audios, results, strict=True)]

    monkeypatch.setattr(AttributeClassifier, "classify", fail_long_clips)
    config = sample_config(str(tmp_path / "out"), "fail", workdir=tmp_path,
                           overrides=[*_overrides(tiny_models), "output.shard_size=10"])
    manifest = run_plain(config)
    assert (manifest.stats.rows, manifest.stats.quarantined) == (8, 2)  # 0870 (7.1 s) and 0920 (6.05 s)
    assert manifest.stats.quarantine_by_reason == {"classifier_error": 2}
    q = quarantine_rows(tmp_path / "out", "fail", manifest.lineage.version)
    assert sorted(r["id"] for r in q) == ["sample/librivox_ss01_0870", "sample/librivox_ss01_0920"]
    assert all(r["stage"] == "classify" and "injected" in r["message"] for r in q)


def test_missing_model_fails_the_run_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    repo = REPO
    code = main(["run", str(repo / "examples" / "quickstart.yaml"), "--set", f"output.root={tmp_path}",
                 "--set", "features.classifiers=[{attribute: emotion, model: /nonexistent/emotion-model}]"])
    assert code == 2
    assert "features.classifiers[0].model" in capsys.readouterr().err
    assert not (tmp_path / "sample").exists()


def test_transformers_backend_end_to_end_stores_the_rendered_prompt(tmp_path: Path) -> None:
    """Real (tiny, random) generation on CPU through the whole pipeline; the row keeps the exact
    text the model saw, rendered with the backbone's own chat template."""
    from schemas.records import Message
    from tasks.llm.chat_template import render_prompt
    from tests.support.tiny_models import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "tiny-lm")
    config = sample_config(str(tmp_path / "out"), "lm", workdir=tmp_path, overrides=[
        "llm.backend=transformers", f"llm.model={model}", "llm.device=cpu", "llm.max_tokens=12",
        "llm.temperature=1.0", "llm.qc.enabled=false"])
    manifest = run_plain(config)
    rows = _rows(tmp_path / "out", "lm", manifest.lineage.version)
    assert manifest.stats.rows + manifest.stats.quarantined == 10 and manifest.stats.rows >= 8
    assert {m.role: m.name for m in manifest.lineage.models}["llm"] == str(model)
    for row in rows.values():
        assert row["generation"]["backend"] == "transformers" and row["generation"]["completion_tokens"] > 0
        expected = render_prompt([Message(role=m["role"], content=m["content"]) for m in row["messages"]],
                                 str(model))
        assert row["rendered_prompt"] == expected and row["seed_description"] in expected


def test_every_model_stage_computes_inside_the_gpu_gate(tiny_models: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate the flow passes (a Prefect concurrency limit) is held around Whisper, each classifier
    and the LLM call of every micro-batch, and released before the next stage."""
    from collections.abc import Iterator
    from contextlib import contextmanager

    from tasks.features.classifiers import AttributeClassifier
    from tasks.llm import make_backend
    from tasks.pipeline import process_shard
    from tasks.plan import load_shard_plan, plan_run
    from tasks.run import run_context

    config = sample_config(str(tmp_path / "out"), "gated", workdir=tmp_path, shard_size=10,
                           overrides=_overrides(tiny_models))
    held: list[str] = []
    events: list[str] = []

    @contextmanager
    def gate(stage: str) -> Iterator[None]:
        assert not held, f"{stage} entered while {held} is held"
        held.append(stage)
        events.append(stage)
        yield
        held.pop()

    original = AttributeClassifier.classify

    def checked(self: AttributeClassifier, batch: list[Any]) -> list[Any]:
        assert held == ["classify"], "a classifier ran outside the gate"
        return original(self, batch)

    monkeypatch.setattr(AttributeClassifier, "classify", checked)
    ctx = run_context(config)
    store = open_store(config.output.root)
    plan_run(config, store, ctx.staging, ctx.run_id)
    outcome = process_shard(load_shard_plan(store, ctx.staging, 0), config, store, ctx,
                            make_backend(config.llm), batch_size=4, gate=gate)
    assert outcome.rows == 10
    # 3 micro-batches of ≤4 clips: Whisper only where a clip lacks a transcript (one clip), the
    # classifier and the LLM in every batch.
    assert events.count("asr") == 1 and events.count("classify") == 3 and events.count("llm") == 3
    assert not held
