"""Model-based extractors (Whisper, audio classifiers), loaded once per process and shared.

Shard tasks run in threads of one worker process: loading a model per shard would cost more
than the shard. Loading happens up front (the flow calls `load_models` before planning), so a
missing model path fails the run with a message naming the setting, before any clip.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from schemas.config import FeaturesConfig

if TYPE_CHECKING:
    from tasks.features.asr import Transcriber
    from tasks.features.classifiers import AttributeClassifier

class ModelLoadError(ValueError):
    """A configured model cannot be loaded; the message names the setting and the fix."""


_CACHE: dict[str, LoadedModels] = {}
_LOCK = threading.Lock()


@dataclass
class LoadedModels:
    transcriber: Transcriber | None = None
    classifiers: list[AttributeClassifier] = field(default_factory=list)
    # One forward pass per model at a time: shard threads share the weights, not the compute.
    locks: dict[str, threading.Lock] = field(default_factory=dict)

    def lock(self, name: str) -> threading.Lock:
        return self.locks.setdefault(name, threading.Lock())

    def versions(self) -> dict[str, str]:
        """Extractor versions for row provenance: which model produced which column."""
        out: dict[str, str] = {}
        if self.transcriber is not None:
            out["asr"] = self.transcriber.model_name
        for c in self.classifiers:
            out[f"classifier.{c.attribute}"] = c.model_name + (f"@{c.revision}" if c.revision else "")
        return out

    def infos(self) -> list[dict[str, str | None]]:
        """Model entries for the manifest's lineage."""
        out: list[dict[str, str | None]] = []
        if self.transcriber is not None:
            out.append({"role": "asr", "name": self.transcriber.model_name, "revision": None})
        out += [{"role": c.attribute, "name": c.model_name, "revision": c.revision} for c in self.classifiers]
        return out


def load_models(config: FeaturesConfig) -> LoadedModels:
    """The models `config` asks for, from the process cache when already loaded."""
    key = config.model_dump_json(include={"asr", "classifiers"})
    with _LOCK:
        if key not in _CACHE:
            models = LoadedModels()
            try:
                if config.asr.enabled:
                    from tasks.features.asr import load_transcriber

                    models.transcriber = load_transcriber(config.asr)
                if config.classifiers:
                    from tasks.features.classifiers import load_classifiers

                    models.classifiers = load_classifiers(config.classifiers)
            except ImportError as exc:
                raise ModelLoadError(f"features: model extractors need the `models` extra "
                                     f"(pip install 'speechpairs[models]'): {exc}") from exc
            except ValueError as exc:  # the loaders name the setting (features.asr.model, …)
                raise ModelLoadError(str(exc)) from exc
            _CACHE[key] = models
        return _CACHE[key]
