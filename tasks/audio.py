"""Decode and validate one clip: bytes → float32 mono 16 kHz, or a named quarantine reason.

Cheap checks run first (missing, zero bytes, header duration) so a 2-hour file or a text file
renamed .wav costs almost nothing. Clipping is measured and recorded, never a reason to drop.

libsndfile (soundfile) is the fast, in-process path for WAV/FLAC/OGG/MP3. Everything it cannot
open (m4a/aac, wma, webm, opus in mp4, …) goes to the `ffmpeg` binary in a child process: a
hostile file can then neither hang the run (every call has a timeout) nor crash the worker, and
ffprobe reads the container header first so a 3-hour file is refused as `too_long` undecoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from schemas.config import AudioConfig
from schemas.records import Clip, QuarantineError, ReasonCode, Stage

AUDIO_VERSION = "soundfile-ffmpeg-soxr/2"

PROBE_TIMEOUT_S = 15.0
DECODE_TIMEOUT_S = 30.0  # plus a tenth of a second per second of audio decoded
# Demuxers ffmpeg may use: audio containers only. Playlists (hls), concat lists and the like
# would let a file named .m4a make ffmpeg open other files or URLs.
FFMPEG_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,asf,aac,ogg,mp3,wav,w64,flac,aiff,caf,au,amr,wv")
MAX_CHANNELS = 64
MAX_SAMPLING_RATE = 768_000
FIX = "check it with `ffprobe <file>` and re-encode it (e.g. to FLAC) or remove it from the corpus"


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


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def read_source_bytes(uri: str) -> bytes:
    """Bytes of a local clip (`file://` or plain path)."""
    path = _local_path(uri)
    if "://" in str(path):
        raise _fail(ReasonCode.unreadable, f"{uri}: remote audio URIs are not supported yet; copy the corpus locally")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(ReasonCode.missing_file, f"{uri}: file not found; fix the path in the manifest") from None
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise _fail(ReasonCode.unreadable,
                    f"{uri}: cannot read ({exc.__class__.__name__}: {exc.strerror or 'I/O error'}); "
                    "check the path and its permissions") from None


def load_audio(clip: Clip, config: AudioConfig) -> DecodedAudio:
    """Decode, check and resample; raises QuarantineError(Stage.audio, reason) for a bad clip."""
    if clip.audio_bytes is not None:
        return decode_bytes(clip.audio_bytes, clip.audio_uri, config)
    data = read_source_bytes(clip.audio_uri)
    return decode_bytes(data, clip.audio_uri, config, path=_local_path(clip.audio_uri))


def decode_bytes(data: bytes, where: str, config: AudioConfig, path: Path | None = None) -> DecodedAudio:
    """`data` → checked 16 kHz mono; `path` (the file `data` was read from) spares ffmpeg a temp copy."""
    if not data:
        raise _fail(ReasonCode.empty, f"{where}: file has 0 bytes")
    digest = hashlib.sha256(data).hexdigest()
    decoded = _read_soundfile(data, where, config)
    if decoded is None:
        decoded = _read_ffmpeg(data, where, config, path)
    samples, sr = decoded
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


def _read_soundfile(data: bytes, where: str, config: AudioConfig) -> tuple[np.ndarray, int] | None:
    """(frames × channels float32, rate) via libsndfile, or None when it does not know the format."""
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None  # not a libsndfile format (or not audio): ffmpeg's turn
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
    return samples, int(sr)


@lru_cache(maxsize=1)
def _ffmpeg() -> tuple[str, str] | None:
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    return (ffmpeg, ffprobe) if ffmpeg and ffprobe else None


def _read_ffmpeg(data: bytes, where: str, config: AudioConfig, path: Path | None) -> tuple[np.ndarray, int]:
    """Probe the header, then decode at most max_duration_s + 1 s of the first audio stream."""
    tools = _ffmpeg()
    if tools is None:
        raise _fail(ReasonCode.unreadable,
                    f"{where}: not a WAV/FLAC/OGG/MP3 file and ffmpeg is not installed to decode it; "
                    "install ffmpeg (apt-get install ffmpeg) or re-encode the corpus as FLAC")
    if path is not None:
        return _decode_file(tools, path, where, config)
    with tempfile.NamedTemporaryFile(prefix="speechpairs-", suffix=".audio") as tmp:
        tmp.write(data)
        tmp.flush()
        return _decode_file(tools, Path(tmp.name), where, config)


def _decode_file(tools: tuple[str, str], path: Path, where: str, config: AudioConfig) -> tuple[np.ndarray, int]:
    ffmpeg, ffprobe = tools
    # `file:` keeps a name starting with '-' from reading as an option; whitelists keep ffmpeg local.
    source = ["-protocol_whitelist", "file", "-format_whitelist", FFMPEG_FORMATS, "-i", f"file:{path}"]
    probe = _run([ffprobe, "-v", "error", *source, "-select_streams", "a:0",
                  "-show_entries", "format=duration:stream=sample_rate,channels,duration", "-of", "json"],
                 PROBE_TIMEOUT_S, where, path)
    if probe.returncode != 0:
        raise _fail(ReasonCode.unreadable,
                    f"{where}: not decodable audio ({_ffmpeg_error(probe.stderr, path) or 'ffprobe failed'}); {FIX}")
    try:
        info: dict[str, Any] = json.loads(probe.stdout or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = {}
    streams = info.get("streams") or [{}]
    stream = streams[0] if isinstance(streams[0], dict) else {}
    sr, channels = _int(stream.get("sample_rate")), _int(stream.get("channels"))
    if not stream or sr is None or channels is None:
        raise _fail(ReasonCode.unreadable, f"{where}: the container holds no audio stream; {FIX}")
    if not (0 < sr <= MAX_SAMPLING_RATE and 0 < channels <= MAX_CHANNELS):
        raise _fail(ReasonCode.unreadable,
                    f"{where}: implausible audio header ({sr} Hz, {channels} channels); {FIX}")
    fmt = info.get("format")
    fmt = fmt if isinstance(fmt, dict) else {}
    declared = _float(fmt.get("duration")) or _float(stream.get("duration"))
    if declared is not None and declared > config.max_duration_s:
        raise _fail(ReasonCode.too_long, f"{where}: {declared:.2f} s (container header) > "
                                         f"audio.max_duration_s={config.max_duration_s}; split the clip")
    cap = config.max_duration_s + 1.0
    decoded = _run([ffmpeg, "-nostdin", "-hide_banner", "-v", "error", *source, "-map", "0:a:0", "-vn", "-sn",
                    "-dn", "-t", f"{cap:.3f}", "-ac", str(channels), "-ar", str(sr), "-c:a", "pcm_f32le",
                    "-f", "f32le", "pipe:1"],
                   DECODE_TIMEOUT_S + cap / 10, where, path)
    errors = _ffmpeg_error(decoded.stderr, path)
    if decoded.returncode != 0:
        raise _fail(ReasonCode.unreadable, f"{where}: ffmpeg could not decode it ({errors or 'no detail'}); {FIX}")
    usable = len(decoded.stdout) // (4 * channels) * 4 * channels
    samples = np.frombuffer(decoded.stdout[:usable], dtype="<f4").astype(np.float32).reshape(-1, channels)
    seconds = samples.shape[0] / sr
    if declared is None and seconds >= cap - 0.5:
        raise _fail(ReasonCode.too_long, f"{where}: longer than audio.max_duration_s={config.max_duration_s} "
                                         f"(its header declares no duration; decoding stopped at {cap:.0f} s); "
                                         "split the clip")
    if errors and declared is not None and seconds < 0.9 * declared - 0.1:
        # A file cut short (partial download): the header promises more than the data holds.
        raise _fail(ReasonCode.unreadable,
                    f"{where}: truncated or corrupt: decoded {seconds:.2f} s of the {declared:.2f} s its header "
                    f"declares ({errors}); re-download or re-encode the file")
    return samples, sr


def _run(cmd: list[str], timeout: float, where: str, path: Path) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise _fail(ReasonCode.unreadable, f"{where}: {Path(cmd[0]).name} did not finish within {timeout:g} s "
                                           f"(a malformed or hostile file?); {FIX}") from None
    except OSError as exc:
        raise _fail(ReasonCode.unreadable, f"{where}: cannot run {Path(cmd[0]).name} ({exc.strerror}); "
                                           "check the ffmpeg installation") from None


_LOG_PREFIX = re.compile(r"^\[[^\]]*@ 0x[0-9a-fA-F]+\]\s*")


def _ffmpeg_error(stderr: bytes, path: Path) -> str:
    """The first two distinct lines ffmpeg logged, without its `[demuxer @ 0x…]` prefixes or our path."""
    lines: list[str] = []
    for raw in stderr.decode("utf-8", errors="replace").splitlines():
        line = _LOG_PREFIX.sub("", raw).replace(f"file:{path}: ", "").replace(f"file:{path}", "input").strip()
        if line and line not in lines:
            lines.append(line)
        if len(lines) == 2:
            break
    return "; ".join(lines)[:200]


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _float(value: object) -> float | None:
    try:
        number = float(str(value))
    except ValueError:
        return None
    return number if np.isfinite(number) and number > 0 else None


def encode_audio(samples: np.ndarray, sampling_rate: int, fmt: str = "flac") -> bytes:
    """The stored audio: 16-bit FLAC (lossless, ~half of WAV) or WAV, decodable by HF `Audio`."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sampling_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def _short(exc: BaseException) -> str:
    """One line of an exception's text; libsndfile's own words (its str() holds a BytesIO repr)."""
    if isinstance(exc, sf.LibsndfileError):
        return exc.error_string.strip()[:200] or "libsndfile error"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text[:200]
