"""Speaker attributes from `transformers` audio-classification models (gender, emotion, age, accent).

One `AttributeClassifier` per configured attribute: `AutoFeatureExtractor` +
`AutoModelForAudioClassification`, loaded by hub id or local directory with the standard
`from_pretrained` (offline it uses the local cache only; nothing here downloads on its own), on
the chosen device. `classify` runs a shard's clips in batches of up to `batch_size`: clips are
sorted by length first so a batch holds similar lengths, a batch closes early rather than pad
more than `max_padding` (10 % on CPU, 30 % on GPU). The feature extractor pads each batch and
the attention mask is passed when the extractor makes one (models trained with
layer-norm feature encoders; group-norm ones such as wav2vec2-base are meant to get plain zero
padding and no mask, which is why the sort matters for them). The top-1 class goes through the
config's `label_map` and `normalise_label`; its probability is the score.

A clip that fails (empty, non-finite, shorter than the model's receptive field, a model error)
becomes a `QuarantineError` in its slot and the others go on: a failing batch is re-run clip by
clip to find the culprit. torch and transformers are imported inside functions: this module
imports without the `models` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from schemas.config import ClassifierConfig
from schemas.records import QuarantineError, ReasonCode, Stage
from tasks.features.labels import SOURCE_CLASSIFIER, normalise_label

__all__ = ["AttributeClassifier", "ClassifierResult", "Prediction", "load_classifiers", "resolve_device"]

SAMPLE_RATE = 16000
# Most padding a batch may carry, as a share of its real samples. On a CPU a padded sample costs as much
# as a real one and batching saves little else, so batches stay tight; a GPU computes the padding
# in parallel and gains more from full batches. A shard's clips sorted by length are close
# neighbours, so batches still fill up; only outliers get a smaller batch.
MAX_PADDING_CPU = 0.1
MAX_PADDING_GPU = 0.3


class Prediction(tuple[str, float]):
    """`(word, score)` that also carries `.model`, the model name `resolve_attributes` records in
    `<attribute>_source`. Compares, unpacks and pickles like the plain 2-tuple."""

    model: str

    def __new__(cls, label: str, score: float, model: str) -> Self:
        self = super().__new__(cls, (label, score))
        self.model = model
        return self

    def __getnewargs__(self) -> tuple[str, float, str]:  # type: ignore[override]
        return self[0], self[1], self.model

    def __repr__(self) -> str:
        return f"Prediction({self[0]!r}, {self[1]!r}, model={self.model!r})"


ClassifierResult = tuple[str, float] | QuarantineError


def resolve_device(device: str, setting: str) -> str:
    """auto -> cuda when torch sees a GPU, else cpu; an explicit cuda without one is a config error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting}: 'cuda' requested but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return device


def _looks_like_path(model: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that names a file system location is a path."""
    return (model.startswith(("/", "./", "../", "~", "\\")) or model.count("/") > 1 or "\\" in model
            or (len(model) > 1 and model[1] == ":"))


def _min_samples(model: Any) -> int:
    """Shortest input giving one frame, for conv feature encoders (wav2vec2, HuBERT, WavLM…); else 1."""
    kernels = getattr(model.config, "conv_kernel", None)
    strides = getattr(model.config, "conv_stride", None)
    if not kernels or not strides:
        return 1
    needed, jump = int(kernels[0]), int(strides[0])
    for kernel, stride in zip(kernels[1:], strides[1:], strict=False):
        needed += (int(kernel) - 1) * jump
        jump *= int(stride)
    return needed


class AttributeClassifier:
    """One loaded audio-classification model for one attribute; `classify` is the whole API."""

    def __init__(self, config: ClassifierConfig, feature_extractor: Any, model: Any, device: str) -> None:
        self.config = config
        self.attribute: str = config.attribute
        self.model_name: str = config.model
        self.revision: str | None = config.revision
        self.device: str = device
        self.batch_size: int = config.batch_size
        self.min_score: float = config.min_score
        self.max_padding: float = MAX_PADDING_CPU if device == "cpu" else MAX_PADDING_GPU
        self._extractor = feature_extractor
        self._model = model
        self._sampling_rate = int(getattr(feature_extractor, "sampling_rate", SAMPLE_RATE) or SAMPLE_RATE)
        self._min_samples = _min_samples(model)
        self._multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
        id2label = getattr(model.config, "id2label", None) or {}
        self.model_labels: list[str] = [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]
        lowered = {str(k).strip().lower(): v for k, v in config.label_map.items()}
        self._words: list[str] = []
        for raw in self.model_labels:
            mapped = config.label_map.get(raw, lowered.get(raw.strip().lower(), raw))
            word = normalise_label(self.attribute, mapped)
            # An "unknown"-style class keeps its cleaned text; resolve_attributes drops it.
            self._words.append(word if word is not None else mapped.strip().lower())

    @property
    def source(self) -> str:
        """The `<attribute>_source` value this classifier's predictions get: `classifier:<model>`."""
        return f"{SOURCE_CLASSIFIER}:{self.model_name}"

    def __repr__(self) -> str:
        return (f"AttributeClassifier({self.attribute!r}, model={self.model_name!r}, "
                f"revision={self.revision!r}, device={self.device!r}, batch_size={self.batch_size})")

    # -- per clip --------------------------------------------------------------------------

    def _error(self, message: str) -> QuarantineError:
        return QuarantineError(Stage.classify, ReasonCode.classifier_error, f"{self.attribute} classifier: {message}")

    def _prepare(self, audio: np.ndarray) -> np.ndarray:
        """1-D finite float32 at the extractor's rate, long enough for the model; else ValueError."""
        arr = np.asarray(audio, dtype=np.float32)
        if arr.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError("empty audio (0 samples)")
        if not np.isfinite(arr).all():
            raise ValueError("audio has NaN or infinite samples")
        if self._sampling_rate != SAMPLE_RATE:
            import soxr

            arr = soxr.resample(arr, SAMPLE_RATE, self._sampling_rate).astype(np.float32, copy=False)
        if arr.size < self._min_samples:
            raise ValueError(f"clip of {arr.size} samples is shorter than the model's receptive field "
                             f"({self._min_samples} samples at {self._sampling_rate} Hz)")
        return arr

    # -- per batch -------------------------------------------------------------------------

    def _probabilities(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """(len(batch), num_labels) class probabilities; raises on any model or extractor error."""
        import torch

        inputs = self._extractor(list(batch), sampling_rate=self._sampling_rate, padding=True,
                                 return_tensors="pt")
        tensors = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            logits = self._model(**tensors).logits.float()
        probs = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
        out = probs.cpu().numpy()
        if out.shape != (len(batch), len(self.model_labels)):
            raise RuntimeError(f"model returned scores of shape {out.shape} for {len(batch)} clips")
        return out

    def _batches(self, ready: list[tuple[int, np.ndarray]]) -> list[list[tuple[int, np.ndarray]]]:
        """Longest first, at most `batch_size` clips; a batch closes early rather than carry more
        than `max_padding` x its real samples as padding (padding buys nothing on a CPU)."""
        ordered = sorted(ready, key=lambda item: item[1].size, reverse=True)
        batches: list[list[tuple[int, np.ndarray]]] = []
        current: list[tuple[int, np.ndarray]] = []
        real = 0
        for item in ordered:
            n = item[1].size
            if current and (len(current) >= self.batch_size
                            or current[0][1].size * (len(current) + 1) > (1.0 + self.max_padding) * (real + n)):
                batches.append(current)
                current, real = [], 0
            current.append(item)
            real += n
        if current:
            batches.append(current)
        return batches

    def _top1(self, probs: np.ndarray) -> ClassifierResult:
        if not np.isfinite(probs).all():
            return self._error("model produced non-finite scores")
        index = int(np.argmax(probs))
        return Prediction(self._words[index], float(min(1.0, max(0.0, probs[index]))), self.model_name)

    def classify(self, audios: Sequence[np.ndarray]) -> list[ClassifierResult]:
        """(word, score in [0, 1]) or a QuarantineError per clip, in input order.

        `audios` are 16 kHz mono float32 arrays. A failure stays with its clip.
        """
        results: list[ClassifierResult | None] = [None] * len(audios)
        ready: list[tuple[int, np.ndarray]] = []
        for i, audio in enumerate(audios):
            try:
                ready.append((i, self._prepare(audio)))
            except Exception as exc:  # noqa: BLE001 - any bad clip goes to quarantine, not the shard
                results[i] = self._error(str(exc))
        for chunk in self._batches(ready):
            try:
                probs = self._probabilities([a for _, a in chunk])
            except Exception as exc:  # noqa: BLE001 - isolate the culprit below
                if len(chunk) == 1:
                    results[chunk[0][0]] = self._error(f"{type(exc).__name__}: {exc}")
                    continue
                self._release()
                for i, audio in chunk:
                    try:
                        results[i] = self._top1(self._probabilities([audio])[0])
                    except Exception as one_exc:  # noqa: BLE001
                        results[i] = self._error(f"{type(one_exc).__name__}: {one_exc}")
                continue
            for (i, _), row in zip(chunk, probs, strict=True):
                results[i] = self._top1(row)
        return [r if r is not None else self._error("no result") for r in results]

    def _release(self) -> None:
        """After a failed batch (often out of memory), hand cached GPU memory back before retrying."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _load_one(index: int, config: ClassifierConfig) -> AttributeClassifier:
    setting = f"features.classifiers[{index}]"
    name = config.model.strip()
    if not name:
        raise ValueError(f"{setting}.model: empty; give a Hugging Face model id or a local directory")
    local = Path(name).expanduser()
    if _looks_like_path(name) and not local.exists():
        raise ValueError(f"{setting}.model: no such directory {name!r}; fix the path, or give a Hugging Face "
                         f"model id (org/name) that is in the local cache")
    if local.exists() and not local.is_dir():
        raise ValueError(f"{setting}.model: {name!r} is a file; give the directory holding config.json "
                         f"and the weights (as written by save_pretrained)")
    try:
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification
    except ImportError as exc:
        raise ValueError(f"{setting}.model: classifiers need the `models` extra "
                         f"(pip install 'speechpairs[models]'): {exc}") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the run's output and logs
    device = resolve_device(config.device, f"{setting}.device")
    source = str(local) if local.is_dir() else name
    try:
        extractor = AutoFeatureExtractor.from_pretrained(source, revision=config.revision)
        model = AutoModelForAudioClassification.from_pretrained(source, revision=config.revision)
    except Exception as exc:  # noqa: BLE001 - OSError offline, ValueError for a non-audio model, …
        where = ("this directory" if local.is_dir() else
                 "the Hugging Face cache (offline runs cannot download: fetch it once with "
                 f"`huggingface-cli download {name}` where there is network, or give a local directory)")
        raise ValueError(f"{setting}.model: cannot load {name!r}"
                         f"{f' at revision {config.revision!r}' if config.revision else ''} as an audio "
                         f"classifier from {where}: {type(exc).__name__}: {exc}") from None
    model.to(device)
    model.eval()
    classifier = AttributeClassifier(config, extractor, model, device)
    known = {label.strip().lower() for label in classifier.model_labels}
    unknown = sorted(k for k in config.label_map if k.strip().lower() not in known)
    if unknown:
        raise ValueError(f"{setting}.label_map: {unknown} are not labels of {name!r}; "
                         f"its labels are {classifier.model_labels}")
    return classifier


def load_classifiers(configs: Sequence[ClassifierConfig]) -> list[AttributeClassifier]:
    """Load every configured classifier up front; a bad model setting raises ValueError naming it."""
    return [_load_one(i, config) for i, config in enumerate(configs)]
