"""Whisper transcripts (openai-whisper) for clips the corpus gives no transcript for.

`load_transcriber(config)` resolves the model once, before any clip, and fails with a message
naming the setting when it cannot (missing checkpoint, unknown name, whisper not installed, CUDA
asked for but absent). `Transcriber.transcribe(audios)` then decodes clips in real batches: the
audio stage guarantees 16 kHz mono clips of at most 30 s, i.e. one Whisper window each, so every
clip is padded to 30 s, turned into a log-Mel spectrogram on its own (whisper's spectrogram
normalises by its maximum, so a batched call would couple clips) and `config.batch_size` of them
go through one `whisper.decode` call — one encoder pass and one greedy loop for the batch.

Per clip the result is an `ASRResult` or a `QuarantineError(Stage.asr, ...)`, in input order:
- bad input or a decoding failure → `asr_error`; a batch whose decode raises is retried clip by
  clip, so one bad clip never fails its batch;
- the hallucination guards of `whisper.transcribe`, applied to the one decode we make:
  `no_speech` (no_speech_prob > no_speech_threshold and avg_logprob < logprob_threshold),
  `repetition` (compression_ratio > compression_ratio_threshold) and `low_logprob`
  (avg_logprob < logprob_threshold). A tripped guard quarantines the clip (`asr_hallucination`,
  the message carries the numbers) or, with `on_hallucination: flag`, keeps it with an empty
  transcript and `flagged` set.

whisper and torch are imported inside functions: this module imports without the `models` extra.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from schemas.config import ASRConfig
from schemas.records import QuarantineError, ReasonCode, Segment, Stage

if TYPE_CHECKING:
    import torch

__all__ = ["SAMPLE_RATE", "WINDOW_S", "ASRResult", "Transcriber", "load_transcriber"]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW_S = 30.0  # one Whisper window; longer clips are the audio stage's to reject
WINDOW_SAMPLES = int(WINDOW_S * SAMPLE_RATE)
# A clip may overrun 30 s by one STFT hop (10 ms, e.g. resampling rounding); it is trimmed.
OVERRUN_TOLERANCE_SAMPLES = 160
AUTO_GPU_MODEL = "large-v3"
AUTO_CPU_MODEL = "small"
INSTALL_HINT = "pip install 'speechpairs[models]' (openai-whisper)"


class ASRResult(BaseModel):
    """One clip's transcript and the decoder's confidence numbers."""

    text: str
    language: str | None
    segments: list[Segment]
    no_speech_prob: float
    avg_logprob: float
    compression_ratio: float
    # "no_speech" | "low_logprob" | "repetition" when a guard tripped under on_hallucination=flag;
    # text and segments are then empty and `flag_message` says why, with the numbers.
    flagged: str | None = None
    flag_message: str | None = None


def _import_whisper() -> Any:
    try:
        import whisper
    except ImportError as exc:
        raise ValueError(f"features.asr.enabled is true but openai-whisper is not installed "
                         f"({exc}); {INSTALL_HINT}, or set features.asr.enabled: false") from exc
    return whisper


def _resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("features.asr.device: 'cuda' but torch sees no CUDA device; "
                         "use 'auto' or 'cpu' on this machine")
    return setting


def _looks_like_path(model: str) -> bool:
    return (os.sep in model or "/" in model or model.startswith(("~", "."))
            or model.endswith((".pt", ".pth", ".bin")))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _language_code(language: str | None) -> str | None:
    """'en' / 'English' / 'english' → 'en'; None stays None (detect per clip)."""
    if language is None:
        return None
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return str(TO_LANGUAGE_CODE[key])
    raise ValueError(f"features.asr.language: {language!r} is not a Whisper language; use a code "
                     f"such as 'en', 'de', 'zh' (see whisper.tokenizer.LANGUAGES) or null to detect")


def load_transcriber(config: ASRConfig, *, sample_len: int | None = None) -> Transcriber:
    """Load the configured Whisper model once; raise ValueError naming the setting on any problem.

    `model`: "auto" (large-v3 with CUDA, small without), a Whisper model name (loaded from
    `download_root`, whisper's cache, downloaded there by whisper when absent) or a local
    checkpoint path. `sample_len` caps the tokens decoded per clip (None: whisper's default,
    half the text context); tests and benches use it to keep micro models quick.
    """
    whisper = _import_whisper()
    device = _resolve_device(config.device)
    language = _language_code(config.language)  # before the (possibly large) model is read
    name = config.model.strip()
    if name == "auto":
        name = AUTO_GPU_MODEL if device == "cuda" else AUTO_CPU_MODEL
    names = list(whisper.available_models())

    revision: str | None
    if name in names:
        try:
            model = whisper.load_model(name, device=device, download_root=config.download_root)
        except Exception as exc:  # download refused / corrupt cache / out of memory
            where = config.download_root or "~/.cache/whisper"
            raise ValueError(
                f"features.asr.model: cannot load Whisper model {name!r} ({type(exc).__name__}: {exc}); "
                f"put the checkpoint in features.asr.download_root ({where}) or set "
                f"features.asr.model to a local checkpoint path") from exc
        model_name = f"whisper:{name}"
        url = str(whisper._MODELS.get(name, ""))
        revision = url.split("/")[-2] if url.count("/") >= 2 else None  # sha256 in whisper's URL
    elif _looks_like_path(name):
        path = os.path.abspath(os.path.expanduser(name))
        if not os.path.isfile(path):
            raise ValueError(
                f"features.asr.model: checkpoint file not found: {path}; set features.asr.model to "
                f"an existing Whisper .pt checkpoint or to a model name ({', '.join(names)})")
        try:
            model = whisper.load_model(path, device=device)
        except Exception as exc:
            raise ValueError(
                f"features.asr.model: {path} is not a loadable Whisper checkpoint "
                f"({type(exc).__name__}: {exc}); it must be a torch file with 'dims' and "
                f"'model_state_dict' as whisper saves them") from exc
        model_name = f"whisper:{path}"
        revision = _sha256(path)[:16]
    else:
        raise ValueError(f"features.asr.model: unknown Whisper model {name!r}; use one of "
                         f"{', '.join(names)}, 'auto', or a local checkpoint path")

    if not model.is_multilingual:
        if language not in (None, "en"):
            raise ValueError(f"features.asr.language: {model_name} is English-only; "
                             f"got {config.language!r} (use 'en', null, or a multilingual model)")
        language = "en"  # English-only models have no language tokens to detect with
    model.eval()
    return Transcriber(model, model_name=model_name, device=device, config=config,
                       language=language, sample_len=sample_len, revision=revision)


class Transcriber:
    """A loaded Whisper model plus the decoding settings; `transcribe` is the per-shard call."""

    def __init__(self, model: Any, *, model_name: str, device: str, config: ASRConfig,
                 language: str | None, sample_len: int | None = None,
                 revision: str | None = None) -> None:
        import whisper
        from whisper.tokenizer import get_tokenizer

        self.model = model
        self.model_name = model_name
        self.revision = revision
        self.device = device
        self.config = config
        self.language = language
        self.batch_size = config.batch_size
        self.fp16 = device.startswith("cuda")
        self.options = whisper.DecodingOptions(
            task="transcribe", language=language, temperature=0.0, sample_len=sample_len,
            without_timestamps=False, fp16=self.fp16)
        self.tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages,
                                       task="transcribe")
        self.n_mels = int(model.dims.n_mels)
        self.seconds_per_timestamp = WINDOW_S / int(model.dims.n_audio_ctx)  # 0.02 s

    def __repr__(self) -> str:
        return f"Transcriber({self.model_name!r}, device={self.device!r}, batch_size={self.batch_size})"

    # -- the per-shard call -------------------------------------------------------------------
    def transcribe(self, audios: Sequence[np.ndarray]) -> list[ASRResult | QuarantineError]:
        """One result per clip, in order; 16 kHz float32 mono clips of at most 30 s."""
        results: list[ASRResult | QuarantineError | None] = [None] * len(audios)
        ready: list[tuple[int, torch.Tensor, float]] = []  # (index, mel, duration_s)
        for i, audio in enumerate(audios):
            try:
                mel, duration = self._prepare(audio)
            except QuarantineError as q:
                results[i] = q
            except Exception as exc:  # noqa: BLE001 - one clip's bug must not take the shard down
                results[i] = _error(f"preparing the spectrogram failed: {type(exc).__name__}: {exc}")
            else:
                ready.append((i, mel, duration))
        for start in range(0, len(ready), self.batch_size):
            batch = ready[start:start + self.batch_size]
            for (i, _mel, duration), outcome in zip(batch, self._decode_batch([m for _, m, _ in batch]),
                                                    strict=True):
                if isinstance(outcome, QuarantineError):
                    results[i] = outcome
                    continue
                try:
                    results[i] = self._result(outcome, duration)
                except Exception as exc:  # noqa: BLE001 - one clip's bug must not take the shard down
                    results[i] = _error(f"reading the decoder output failed: {type(exc).__name__}: {exc}")
        return [r if r is not None else _error("no result (internal error)") for r in results]

    # -- steps ----------------------------------------------------------------------------------
    def _prepare(self, audio: np.ndarray) -> tuple[torch.Tensor, float]:
        import torch
        import whisper

        array = np.asarray(audio, dtype=np.float32)
        if array.ndim != 1:
            raise _error(f"expected mono 1-D audio, got shape {array.shape}")
        if array.size == 0:
            raise _error("empty audio")
        if not np.isfinite(array).all():
            raise _error(f"{int((~np.isfinite(array)).sum())} non-finite samples")
        duration = array.size / SAMPLE_RATE
        if array.size > WINDOW_SAMPLES + OVERRUN_TOLERANCE_SAMPLES:
            raise _error(f"clip is {duration:.2f} s, longer than Whisper's {WINDOW_S:.0f}-s window "
                         f"(audio.max_duration_s should have stopped it)")
        padded = whisper.pad_or_trim(torch.from_numpy(np.ascontiguousarray(array)))
        mel = whisper.log_mel_spectrogram(padded, n_mels=self.n_mels, device=self.device)
        return mel, min(duration, WINDOW_S)

    def _decode_batch(self, mels: list[torch.Tensor]) -> list[Any]:
        """DecodingResults for a batch; if the batched call raises, clip by clip to isolate it."""
        import torch
        import whisper

        try:
            return list(whisper.decode(self.model, torch.stack(mels), self.options))
        except Exception as exc:  # noqa: BLE001 - isolate the failing clip below
            if len(mels) == 1:
                return [_error(f"whisper decode failed: {type(exc).__name__}: {exc}")]
            log.warning("whisper batch of %d failed (%s: %s); retrying clip by clip",
                        len(mels), type(exc).__name__, exc)
        out: list[Any] = []
        for mel in mels:
            try:
                out.append(whisper.decode(self.model, mel.unsqueeze(0), self.options)[0])
            except Exception as exc:  # noqa: BLE001 - quarantine this clip, keep the batch
                out.append(_error(f"whisper decode failed: {type(exc).__name__}: {exc}"))
        return out

    def _result(self, decoded: Any, duration: float) -> ASRResult | QuarantineError:
        cfg = self.config
        no_speech = float(decoded.no_speech_prob)
        logprob = float(decoded.avg_logprob)
        ratio = float(decoded.compression_ratio)
        if not (math.isfinite(logprob) and math.isfinite(ratio)):
            return _error(f"decoder returned non-finite scores (avg_logprob {logprob}, "
                          f"compression_ratio {ratio})")
        language = self.language or (str(decoded.language) if decoded.language else None)
        flag = _guard(no_speech, logprob, ratio, cfg)
        if flag is not None:
            code, why = flag
            if cfg.on_hallucination == "quarantine":
                return QuarantineError(Stage.asr, ReasonCode.asr_hallucination, why)
            return ASRResult(text="", language=language, segments=[], no_speech_prob=no_speech,
                             avg_logprob=logprob, compression_ratio=ratio, flagged=code, flag_message=why)
        text = str(decoded.text).strip()
        return ASRResult(text=text, language=language, segments=self._segments(decoded.tokens, text, duration),
                         no_speech_prob=no_speech, avg_logprob=logprob, compression_ratio=ratio)

    def _segments(self, tokens: Sequence[int], text: str, duration: float) -> list[Segment]:
        """Timestamp tokens → segments, as whisper.transcribe splits them; clamped to the clip."""
        ts_begin = self.tokenizer.timestamp_begin
        eot = self.tokenizer.eot
        segments: list[Segment] = []
        start: float | None = None
        pending: list[int] = []

        def emit(end: float) -> None:
            piece = self.tokenizer.decode(pending).strip()
            s = min(max(round(start or 0.0, 2), 0.0), duration)
            e = min(max(round(end, 2), s), duration)
            if piece:
                segments.append(Segment(start_s=s, end_s=e, text=piece))

        for token in tokens:
            token = int(token)
            if token >= ts_begin:
                time = (token - ts_begin) * self.seconds_per_timestamp
                if pending:
                    emit(time)
                    pending = []
                start = time  # a closing timestamp may also open the next segment
            elif token < eot:
                pending.append(token)
        if pending:
            emit(duration)
        if not segments and text:
            segments.append(Segment(start_s=0.0, end_s=duration, text=text))
        return segments


def _guard(no_speech: float, logprob: float, ratio: float, cfg: ASRConfig) -> tuple[str, str] | None:
    """(code, message with the numbers) for the first guard that trips, as whisper.transcribe."""
    if no_speech > cfg.no_speech_threshold and logprob < cfg.logprob_threshold:
        return "no_speech", (f"no_speech: no_speech_prob {no_speech:.3f} > features.asr.no_speech_threshold "
                             f"{cfg.no_speech_threshold} and avg_logprob {logprob:.3f} < "
                             f"features.asr.logprob_threshold {cfg.logprob_threshold}")
    if ratio > cfg.compression_ratio_threshold:
        return "repetition", (f"repetition: compression_ratio {ratio:.2f} > "
                              f"features.asr.compression_ratio_threshold {cfg.compression_ratio_threshold}")
    if logprob < cfg.logprob_threshold:
        return "low_logprob", (f"low_logprob: avg_logprob {logprob:.3f} < features.asr.logprob_threshold "
                               f"{cfg.logprob_threshold}")
    return None


def _error(message: str) -> QuarantineError:
    return QuarantineError(Stage.asr, ReasonCode.asr_error, message)
