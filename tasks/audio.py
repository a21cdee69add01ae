"""Decode and validate one clip: bytes → float32 mono 16 kHz, or a named quarantine reason.

Cheap checks run first (missing, zero bytes, header duration) so a 2-hour file or a text file
renamed .wav costs almost nothing. Clipping is measured and recorded, never a reason to drop.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from schemas.config import AudioConfig
from schemas.records import Clip, QuarantineError, ReasonCode, Stage

AUDIO_VERSION = "soundfile-soxr/1"


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, `sampling_rate`
    sampling_rate: int
    source_sampling_rate: int
    source_channels: int
    duration_s: float
    sha256: str  # of the source file's bytes
    clipping_ratio: float


def _fail(reason: ReasonCode, message: str) -> QuarantineError:
    return QuarantineError(Stage.audio, reason, message)


def read_source_bytes(uri: str) -> bytes:
    """Bytes of a local clip (`file://` or plain path)."""
    path = Path(uri.removeprefix("file://"))
    if "://" in str(path):
        raise _fail(ReasonCode.unreadable, f"{uri}: remote audio URIs are not supported yet; copy the corpus locally")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(ReasonCode.missing_file, f"{uri}: file not found; fix the path in the manifest") from None
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise _fail(ReasonCode.unreadable, f"{uri}: cannot read ({exc.__class__.__name__}: {exc})") from None


def load_audio(clip: Clip, config: AudioConfig) -> DecodedAudio:
    """Decode, check and resample; raises QuarantineError(Stage.audio, reason) for a bad clip."""
    data = clip.audio_bytes if clip.audio_bytes is not None else read_source_bytes(clip.audio_uri)
    return decode_bytes(data, clip.audio_uri, config)


def decode_bytes(data: bytes, where: str, config: AudioConfig) -> DecodedAudio:
    if not data:
        raise _fail(ReasonCode.empty, f"{where}: file has 0 bytes")
    digest = hashlib.sha256(data).hexdigest()
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise _fail(ReasonCode.unreadable,
                    f"{where}: not decodable audio ({_short(exc)}); re-encode as WAV/FLAC/OGG/MP3") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise _fail(ReasonCode.empty, f"{where}: no audio frames")
    header_duration = info.frames / info.samplerate
    if header_duration > config.max_duration_s:
        raise _fail(ReasonCode.too_long,
                    f"{where}: {header_duration:.2f} s > audio.max_duration_s={config.max_duration_s}; split the clip")
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise _fail(ReasonCode.unreadable, f"{where}: decoding failed ({_short(exc)}); file may be truncated") from None
    if samples.shape[0] == 0:
        raise _fail(ReasonCode.empty, f"{where}: no audio frames")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise _fail(ReasonCode.non_finite, f"{where}: {bad} NaN/Inf samples")
    channels = samples.shape[1]
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    duration = mono.shape[0] / sr
    if duration < config.min_duration_s:
        raise _fail(ReasonCode.too_short, f"{where}: {duration:.3f} s < audio.min_duration_s={config.min_duration_s}")
    if duration > config.max_duration_s:
        raise _fail(ReasonCode.too_long, f"{where}: {duration:.2f} s > audio.max_duration_s={config.max_duration_s}")
    peak = float(np.max(np.abs(mono)))
    peak_db = 20 * np.log10(peak) if peak > 0 else -np.inf
    if peak_db < config.silence_dbfs:
        raise _fail(ReasonCode.silent, f"{where}: peak {peak_db:.1f} dBFS < audio.silence_dbfs={config.silence_dbfs}")
    clipping = float(np.mean(np.abs(mono) >= config.clip_level))
    target = config.sampling_rate
    out = mono if sr == target else soxr.resample(mono, sr, target, quality="HQ").astype(np.float32, copy=False)
    return DecodedAudio(
        samples=np.ascontiguousarray(out, dtype=np.float32),
        sampling_rate=target,
        source_sampling_rate=int(sr),
        source_channels=int(channels),
        duration_s=out.shape[0] / target,
        sha256=digest,
        clipping_ratio=clipping,
    )


def encode_audio(samples: np.ndarray, sampling_rate: int, fmt: str = "flac") -> bytes:
    """The stored audio: 16-bit FLAC (lossless, ~half of WAV) or WAV, decodable by HF `Audio`."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sampling_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text[:200]
