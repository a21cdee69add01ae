"""transformers audio classifiers, exercised for real on a tiny random wav2vec2 saved and loaded by path.

Offline: HF_HUB_OFFLINE is set (and huggingface_hub's flag patched, in case it was imported
earlier), so nothing here can reach the network.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")

from schemas.config import ClassifierConfig
from schemas.records import QuarantineError, ReasonCode, Stage
from tasks.features.classifiers import AttributeClassifier, load_classifiers
from tests.support.paths import REPO
from tests.support.tiny_models import build_tiny_audio_classifier

AUDIO = REPO / "examples" / "sample_corpus" / "audio"
MODEL_LABELS = ["ang", "hap", "neu", "sad", "LABEL_4"]
LABEL_MAP = {"LABEL_4": "Surprise"}  # a model whose config never named one class
WORDS = {"angry", "happy", "neutral", "sad", "surprised"}


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    import huggingface_hub.constants as hf_constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # seed/std chosen so the 10 sample clips get 3 different top labels and well-separated scores
    return build_tiny_audio_classifier(tmp_path_factory.mktemp("clf") / "tiny-emotion", MODEL_LABELS,
                                       seed=5, weight_std=0.4)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    import soundfile as sf
    import soxr

    out = []
    for path in sorted(AUDIO.iterdir()):
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
        if sr != 16000:
            audio = soxr.resample(audio, sr, 16000)
        out.append(np.ascontiguousarray(audio, dtype=np.float32))
    assert len(out) == 10
    return out


def _config(model: str | Path, batch_size: int = 3, **kw: Any) -> ClassifierConfig:
    kw.setdefault("device", "cpu")
    kw.setdefault("label_map", LABEL_MAP)
    return ClassifierConfig(attribute="emotion", model=str(model), batch_size=batch_size, **kw)


@pytest.fixture(scope="module")
def classifier(model_dir: Path) -> AttributeClassifier:
    (clf,) = load_classifiers([_config(model_dir)])
    return clf


@pytest.fixture(scope="module")
def single(classifier: AttributeClassifier, clips: list[np.ndarray]) -> list[tuple[str, float]]:
    """Reference: each clip alone, no padding at all."""
    out = []
    for clip in clips:
        (result,) = classifier.classify([clip])
        assert isinstance(result, tuple)
        out.append(result)
    return out


def _with_batch(clf: AttributeClassifier, batch_size: int, audios: list[np.ndarray],
                max_padding: float = 10.0) -> list[Any]:
    """classify() with another batch size; by default no padding cap, so batches really are full."""
    old = clf.batch_size, clf.max_padding
    clf.batch_size, clf.max_padding = batch_size, max_padding
    try:
        return clf.classify(audios)
    finally:
        clf.batch_size, clf.max_padding = old


def _assert_same(got: list[Any], want: list[tuple[str, float]], tol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert isinstance(g, tuple), (i, g)
        assert g[0] == w[0], (i, g, w)
        assert g[1] == pytest.approx(w[1], abs=tol), (i, g, w)


def test_loaded_by_path(classifier: AttributeClassifier, model_dir: Path) -> None:
    assert classifier.attribute == "emotion"
    assert classifier.model_name == str(model_dir)
    assert classifier.revision is None
    assert classifier.device == "cpu"
    assert classifier.model_labels == MODEL_LABELS
    assert classifier.source == f"classifier:{model_dir}"


def test_batched_labels_scores_in_order(classifier: AttributeClassifier, clips: list[np.ndarray],
                                        single: list[tuple[str, float]]) -> None:
    results = classifier.classify(clips)  # batch_size 3 over 10 clips
    assert len(results) == len(clips)
    for label, score in results:  # type: ignore[misc]
        assert label in WORDS
        assert 0.0 <= score <= 1.0
    # same order as the input: each slot equals that clip classified alone
    _assert_same(results, single)
    # the fixture model is input-sensitive, so the order check above has teeth
    scores = sorted(s for _, s in single)
    assert min(np.diff(scores)) > 1e-3
    assert len({label for label, _ in single}) >= 2


def test_score_is_softmax_top1_through_label_map(classifier: AttributeClassifier, model_dir: Path,
                                                 clips: list[np.ndarray],
                                                 single: list[tuple[str, float]]) -> None:
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    extractor = AutoFeatureExtractor.from_pretrained(model_dir)
    model = AutoModelForAudioClassification.from_pretrained(model_dir).eval()
    expected_word = {"ang": "angry", "hap": "happy", "neu": "neutral", "sad": "sad", "LABEL_4": "surprised"}
    for clip, (label, score) in zip(clips[:4], single[:4], strict=True):
        inputs = extractor(clip, sampling_rate=16000, return_tensors="pt")
        with torch.inference_mode():
            probs = torch.softmax(model(**inputs).logits[0], dim=-1)
        top = int(probs.argmax())
        assert label == expected_word[model.config.id2label[top]]
        assert score == pytest.approx(float(probs[top]), abs=1e-5)


def test_batch_1_and_16_agree(classifier: AttributeClassifier, clips: list[np.ndarray],
                              single: list[tuple[str, float]]) -> None:
    _assert_same(_with_batch(classifier, 1, clips), single)
    _assert_same(_with_batch(classifier, 16, clips), single)  # one batch, 2.0-7.1 s padded to 7.1 s
    _assert_same(_with_batch(classifier, 16, clips, max_padding=0.1), single)
    # Sanity of the check itself: padding without the attention mask does change scores.
    extractor = classifier._extractor
    extractor.return_attention_mask = False
    try:
        unmasked = _with_batch(classifier, 16, clips)
    finally:
        extractor.return_attention_mask = True
    assert max(abs(u[1] - s[1]) for u, s in zip(unmasked, single, strict=True)) > 1e-3


def test_batches_sorted_capped_and_tight(classifier: AttributeClassifier) -> None:
    rng = np.random.default_rng(0)
    ready = [(i, np.zeros(int(n), dtype=np.float32)) for i, n in enumerate(rng.integers(400, 16000 * 8, 200))]
    old = classifier.batch_size, classifier.max_padding
    classifier.batch_size, classifier.max_padding = 16, 0.1
    try:
        batches = classifier._batches(ready)
    finally:
        classifier.batch_size, classifier.max_padding = old
    assert sorted(i for batch in batches for i, _ in batch) == list(range(200))  # each clip once
    sizes = [a.size for batch in batches for _, a in batch]
    assert sizes == sorted(sizes, reverse=True)
    for batch in batches:
        assert 1 <= len(batch) <= 16
        padded, real = batch[0][1].size * len(batch), sum(a.size for _, a in batch)
        assert padded <= 1.1 * real
    assert max(len(b) for b in batches) == 16  # 200 close neighbours: batches do fill up
    assert classifier.max_padding == 0.1  # the CPU default


def test_bad_clip_quarantined_alone(classifier: AttributeClassifier, clips: list[np.ndarray],
                                    single: list[tuple[str, float]]) -> None:
    nan_clip = clips[5].copy()
    nan_clip[100] = np.nan
    audios = [clips[0], np.zeros(0, dtype=np.float32), clips[2], nan_clip, clips[4],
              np.zeros(200, dtype=np.float32), clips[6]]
    results = classifier.classify(audios)
    bad = {1: "empty audio", 3: "NaN", 5: "receptive field"}
    for i, result in enumerate(results):
        if i in bad:
            assert isinstance(result, QuarantineError), (i, result)
            assert result.stage is Stage.classify
            assert result.reason is ReasonCode.classifier_error
            assert result.message.startswith("emotion classifier: ")
            assert bad[i] in result.message
        else:
            _assert_same([result], [single[i]])


class _FailsOnLength:
    """Wraps the model: any forward pass containing a clip of `bad_len` samples raises."""

    def __init__(self, model: Any, bad_len: int) -> None:
        self.model, self.bad_len = model, bad_len
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **inputs: Any) -> Any:
        lengths = inputs["attention_mask"].sum(-1).tolist()
        self.batches.append(len(lengths))
        if self.bad_len in lengths:
            raise RuntimeError("simulated model failure")
        return self.model(**inputs)


def test_batch_failure_isolates_the_clip(classifier: AttributeClassifier, clips: list[np.ndarray],
                                         single: list[tuple[str, float]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    failing = _FailsOnLength(classifier._model, len(clips[7]))
    monkeypatch.setattr(classifier, "_model", failing)
    results = _with_batch(classifier, 4, clips)
    assert isinstance(results[7], QuarantineError)
    assert "RuntimeError: simulated model failure" in results[7].message
    _assert_same([r for i, r in enumerate(results) if i != 7], [s for i, s in enumerate(single) if i != 7])
    assert 1 in failing.batches and max(failing.batches) == 4  # batched first, then clip by clip


def test_missing_path_fails_up_front(model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=r"features\.classifiers\[0\]\.model: no such directory") as err:
        load_classifiers([_config(missing)])
    assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match=r"features\.classifiers\[1\]\.model"):
        load_classifiers([_config(model_dir), ClassifierConfig(attribute="gender", model=str(missing))])


def test_uncached_hub_id_fails_offline() -> None:
    with pytest.raises(ValueError, match=r"features\.classifiers\[0\]\.model: cannot load "
                                         r"'speechpairs-test/no-such-model'.*huggingface-cli download"):
        load_classifiers([_config("speechpairs-test/no-such-model", label_map={})])


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"features\.classifiers\[0\]\.model: cannot load .* this directory"):
        load_classifiers([_config(tmp_path, label_map={})])


def test_label_map_keys_checked(model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"features\.classifiers\[0\]\.label_map: \['happpy'\]"):
        load_classifiers([_config(model_dir, label_map={"happpy": "happy"})])


def test_cuda_without_gpu_is_a_config_error(model_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=r"features\.classifiers\[0\]\.device: 'cuda' requested"):
        load_classifiers([_config(model_dir, device="cuda")])


def test_modules_import_without_models_extra() -> None:
    code = ("import importlib.abc, sys\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'):\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import tasks.features.classifiers as c, tasks.features.labels\n"
            "from schemas.config import ClassifierConfig\n"
            "try:\n"
            "    c.load_classifiers([ClassifierConfig(attribute='age', model='org/age')])\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "features.classifiers[0].model: classifiers need the `models` extra" in out.stdout


def test_predictions_carry_the_model_into_provenance(classifier: AttributeClassifier, model_dir: Path,
                                                     single: list[tuple[str, float]]) -> None:
    import pickle

    from schemas.records import Features
    from tasks.features.labels import resolve_attributes

    prediction = single[0]
    assert pickle.loads(pickle.dumps(prediction)) == prediction
    assert pickle.loads(pickle.dumps(prediction)).model == str(model_dir)  # type: ignore[attr-defined]
    out = resolve_attributes(Features(), {}, {"emotion": prediction}, {"emotion": 0.0})
    assert (out.emotion, out.emotion_score) == prediction
    assert out.emotion_source == f"classifier:{model_dir}"
    above = prediction[1] + 1e-6
    out = resolve_attributes(Features(), {}, {"emotion": prediction}, {"emotion": above})
    assert (out.emotion, out.emotion_source) == (None, f"classifier_below_threshold:{model_dir}")


@pytest.mark.gpu
def test_classifier_on_cuda_matches_cpu(tmp_path: Path) -> None:
    """The GPU path: same model, batched on cuda, same top labels as on the CPU."""
    model = build_tiny_audio_classifier(tmp_path / "m", ["ang", "hap", "neu", "sad"])
    clips = [np.sin(np.linspace(0, 400 * (i + 1), 16000 * (i + 1))).astype(np.float32) * 0.3 for i in range(4)]
    [cpu] = load_classifiers([ClassifierConfig(attribute="emotion", model=str(model), device="cpu", batch_size=4)])
    [gpu] = load_classifiers([ClassifierConfig(attribute="emotion", model=str(model), device="cuda", batch_size=4)])
    got_cpu, got_gpu = cpu.classify(clips), gpu.classify(clips)
    assert [r[0] for r in got_cpu] == [r[0] for r in got_gpu]  # type: ignore[index]
    assert all(abs(a[1] - b[1]) < 1e-3 for a, b in zip(got_cpu, got_gpu, strict=True))  # type: ignore[index]
