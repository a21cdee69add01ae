"""Decode and validate one clip: bytes → float32 mono 16 kHz, or a named quarantine reason.

Cheap checks run first (missing, zero bytes, header duration) so a 2-hour file or a text file
renamed .wav costs almost nothing. Clipping is measured and recorded, never a reason to drop.
Sample values are checked before anything is measured: NaN/Inf (`non_finite`), a peak far above
full scale (`out_of_range`), silence once the DC offset is removed (`silent`); the pipeline adds
`no_speech` from the VAD (`require_speech`) for speech sources.

libsndfile (soundfile) is the fast, in-process path for WAV/FLAC/OGG/MP3. Everything it cannot
open (m4a/aac, wma, webm, opus in mp4, …) goes to the `ffmpeg` binary in a child process: a
hostile file can then neither hang the run (every call has a timeout) nor crash the worker, and
ffprobe reads the container header first so a 3-hour file is refused as `too_long` undecoded
(tasks/ffmpeg.py runs both, for long recordings too).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
import soxr

from schemas.config import AudioConfig
from schemas.records import Clip, QuarantineError, ReasonCode, Stage
from storage import sources
from tasks.ffmpeg import FFMPEG_FORMATS, FIX, error_lines, ffmpeg_tools, probe, run

AUDIO_VERSION = "soundfile-ffmpeg-soxr/3"  # 3: DC offset removed, out_of_range

PROBE_TIMEOUT_S = 15.0
DECODE_TIMEOUT_S = 30.0  # plus a tenth of a second per second of audio decoded
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3  # AudioConfig.max_file_bytes' default
SF_COUNT_MAX = 2**63 - 1  # libsndfile's frame count for a stream whose header holds no length
# More samples per byte than any codec reaches on real audio: a header claiming that is not trusted.
MAX_SAMPLES_PER_BYTE = 4096
NOT_A_FILE_FIX = "only regular audio files are read: remove it from the corpus or put the audio file in its place"


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


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


@lru_cache(maxsize=1)
def _pseudo_devices() -> frozenset[int]:
    """Device ids of /proc, /sys and /dev when they are mounts of their own (their files lie about
    their size: /proc/self/environ says 0 bytes and holds the environment)."""
    try:
        root = os.stat("/").st_dev
    except OSError:
        return frozenset()
    devices = set()
    for mount in ("/proc", "/sys", "/dev"):
        try:
            device = os.stat(mount).st_dev
        except OSError:
            continue
        if device != root:
            devices.add(device)
    return frozenset(devices)


def _refuse_special(st: os.stat_result, path: Path, where: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _fail(ReasonCode.not_a_file, f"{where}: {_file_kind(st.st_mode)}, not a regular file; {NOT_A_FILE_FIX}")
    real = os.path.realpath(path)
    if st.st_dev in _pseudo_devices() or real.startswith(("/proc/", "/sys/", "/dev/")):
        raise _fail(ReasonCode.not_a_file, f"{where}: a kernel pseudo-file ({real}), not audio; {NOT_A_FILE_FIX}")


def open_regular(path: Path, where: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> tuple[BinaryIO, int]:
    """(open binary file, its size) for a regular file of at most `max_bytes`, else QuarantineError.

    Never blocks and never reads a special file: the path is stat'ed first (a FIFO, device, socket,
    /proc or /sys entry is `not_a_file`, a dangling link too), then opened with O_NONBLOCK and the
    descriptor checked again, so a file swapped for a FIFO in between is refused as well.
    """
    if "\0" in str(path):
        raise _fail(ReasonCode.unreadable, f"{where}: the path contains a NUL byte; fix the path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise _fail(ReasonCode.not_a_file, f"{where}: a dangling symbolic link (to {_link_target(path)!r}, "
                                               "which does not exist); fix or remove the link") from None
        raise _fail(ReasonCode.missing_file, f"{where}: file not found; fix the path in the manifest") from None
    except OSError as exc:
        raise _os_fail(exc, where) from None
    _refuse_special(st, path, where)
    if max_bytes is not None and st.st_size > max_bytes:
        raise too_large(st.st_size, max_bytes, where)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _fail(ReasonCode.missing_file, f"{where}: file not found; fix the path in the manifest") from None
    except OSError as exc:
        raise _os_fail(exc, where) from None
    try:
        st = os.fstat(fd)
        _refuse_special(st, path, where)
        if max_bytes is not None and st.st_size > max_bytes:
            raise too_large(st.st_size, max_bytes, where)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def too_large(size: int, limit: int, where: str) -> QuarantineError:
    return _fail(ReasonCode.too_large, f"{where}: {size:,} bytes > audio.max_file_bytes={limit:,}; not read: split "
                                       "or re-encode the file, or raise audio.max_file_bytes")


def _os_fail(exc: OSError, where: str) -> QuarantineError:
    if exc.errno == errno.ELOOP:
        return _fail(ReasonCode.not_a_file, f"{where}: a symbolic-link loop; fix or remove the link")
    return _fail(ReasonCode.unreadable, f"{where}: cannot read ({exc.__class__.__name__}: "
                                        f"{exc.strerror or 'I/O error'}); check the path and its permissions")


def _read_all(f: BinaryIO, size: int, where: str) -> bytes:
    """The file's `size` bytes (what fstat said: never more, whatever a growing file holds by now)."""
    try:
        return f.read(size)
    except OSError as exc:
        raise _os_fail(exc, where) from None


def read_remote(uri: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """Bytes of one remote clip (s3://, http(s)://) through storage/sources.py, size checked before
    the body is read: a missing object is `missing_file`, one above the cap `too_large`, access
    denied or an unreachable store `storage_error` (transient: the run stops before commit and the
    next run retries), each naming the URI and the setting to check."""
    try:
        return sources.read(uri, max_bytes=max_bytes)
    except sources.SourceReadError as exc:
        raise remote_failure(exc, uri, max_bytes) from None


def remote_failure(exc: sources.SourceReadError, uri: str, max_bytes: int | None) -> QuarantineError:
    """A remote read failure as the audio stage's reasons, for whole clips and long recordings alike."""
    if exc.problem == "missing":
        return _fail(ReasonCode.missing_file, str(exc))
    if exc.problem == "too_large" and max_bytes is not None:
        return too_large(exc.size or 0, max_bytes, uri)
    return _fail(ReasonCode.storage_error, str(exc))


def read_source_bytes(uri: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """Bytes of a clip: a local regular file (`file://` or plain path) or a remote object, of at
    most `max_bytes`."""
    if sources.is_remote(uri):
        return read_remote(uri, max_bytes)
    path = _local_path(uri)
    if "://" in str(path):
        raise _fail(ReasonCode.unreadable, f"{uri}: only local paths, s3:// and http(s):// URIs are read")
    f, size = open_regular(path, uri, max_bytes)
    with f:
        return _read_all(f, size, uri)


def load_audio(clip: Clip, config: AudioConfig) -> DecodedAudio:
    """Decode, check and resample; raises QuarantineError(Stage.audio, reason) for a bad clip.

    A file is read only when it is a regular file within `audio.max_file_bytes`, and only after its
    libsndfile header (when it has one that states a length) is within `audio.max_duration_s`.
    """
    if clip.audio_bytes is not None:
        if len(clip.audio_bytes) > config.max_file_bytes:
            raise too_large(len(clip.audio_bytes), config.max_file_bytes, clip.audio_uri)
        return decode_bytes(clip.audio_bytes, clip.audio_uri, config)
    if sources.is_remote(clip.audio_uri):  # one object read per clip, never the corpus
        return decode_bytes(read_remote(clip.audio_uri, config.max_file_bytes), clip.audio_uri, config)
    path = _local_path(clip.audio_uri)
    if "://" in str(path):
        raise _fail(ReasonCode.unreadable,
                    f"{clip.audio_uri}: only local paths, s3:// and http(s):// URIs are read")
    f, size = open_regular(path, clip.audio_uri, config.max_file_bytes)
    with f:
        _check_header_first(f, size, clip.audio_uri, config)
        f.seek(0)
        data = _read_all(f, size, clip.audio_uri)
    return decode_bytes(data, clip.audio_uri, config, path=path)


def _check_header_first(f: BinaryIO, size: int, where: str, config: AudioConfig) -> None:
    """`too_long` from a libsndfile header alone, before the file's body is read."""
    try:
        info = sf.info(f)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
        return  # not a libsndfile format: decode_bytes hands it to ffmpeg, which probes first
    if info.samplerate > 0 and _plausible_length(info, size):
        _refuse_long_header(info, where, config)


def _plausible_length(info: Any, size: int) -> bool:
    """Whether a libsndfile header's frame count can be trusted. A FLAC written through a pipe has
    none (libsndfile says SF_COUNT_MAX frames, "209146758205323.72 s"); such a file is measured
    by decoding at most max_duration_s + 1 s instead of being called too long."""
    return 0 < info.frames < SF_COUNT_MAX and info.frames * max(1, info.channels) <= max(size, 1) * MAX_SAMPLES_PER_BYTE


def _refuse_long_header(info: Any, where: str, config: AudioConfig) -> None:
    header_duration = info.frames / info.samplerate
    if header_duration > config.max_duration_s:
        raise _fail(ReasonCode.too_long,
                    f"{where}: {header_duration:.2f} s > audio.max_duration_s={config.max_duration_s}; split the clip")


def decode_bytes(data: bytes, where: str, config: AudioConfig, path: Path | None = None) -> DecodedAudio:
    """`data` → checked 16 kHz mono; `path` (the file `data` was read from) spares ffmpeg a temp copy."""
    if not data:
        raise _fail(ReasonCode.empty, f"{where}: file has 0 bytes")
    digest = hashlib.sha256(data).hexdigest()
    decoded = _read_soundfile(data, where, config, path)
    if decoded is None:
        decoded = _read_ffmpeg(data, where, config, path)
    samples, sr = decoded
    if samples.shape[0] == 0:
        raise _fail(ReasonCode.empty, f"{where}: no audio frames")
    mono, channels, clipping = _check_samples(samples, where, config)
    duration = mono.shape[0] / sr
    if duration < config.min_duration_s:
        raise _fail(ReasonCode.too_short, f"{where}: {duration:.3f} s < audio.min_duration_s={config.min_duration_s}")
    if duration > config.max_duration_s:
        raise _fail(ReasonCode.too_long, f"{where}: {duration:.2f} s > audio.max_duration_s={config.max_duration_s}")
    mono = _remove_dc(mono, where, config)
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


def _check_samples(samples: np.ndarray, where: str, config: AudioConfig) -> tuple[np.ndarray, int, float]:
    """(mono, source channels, clipping ratio) of finite samples within `audio.max_peak`.

    Non-finite samples are `non_finite`; a peak far beyond full scale (a float file holding 1e30)
    is `out_of_range`, where it would otherwise be measured as +577 LUFS. Clipping is measured on
    the samples as stored, before the DC offset is removed.
    """
    finite = np.isfinite(samples)
    if not finite.all():
        raise _fail(ReasonCode.non_finite, f"{where}: {int((~finite).sum())} NaN/Inf samples")
    peak = float(np.max(np.abs(samples)))
    if peak > config.max_peak:
        raise _fail(ReasonCode.out_of_range,
                    f"{where}: sample peak {peak:.3g} ({20 * np.log10(peak):+.0f} dBFS) > audio.max_peak="
                    f"{config.max_peak:g} ({20 * np.log10(config.max_peak):+.0f} dBFS): float samples are not "
                    "scaled to [-1, 1]; re-export the file normalised (e.g. `sox in.wav -b 16 out.wav gain -n`)")
    channels = samples.shape[1]
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    return mono, int(channels), float(np.mean(np.abs(mono) >= config.clip_level))


DC_MIN_RATIO = 0.01  # an offset 40 dB or more below the signal's peak stays in the stored samples


def _remove_dc(mono: np.ndarray, where: str, config: AudioConfig) -> np.ndarray:
    """`mono` less its mean, or `silent` when what is left peaks below `audio.silence_dbfs`.

    A DC offset is not signal: left in, a constant file would pass the silence check at its offset's
    level and a VAD would count it as energy. A pure-DC file (or DC plus a whisper of noise) is
    therefore `silent`, and every later stage measures the audio without its offset. An offset
    under DC_MIN_RATIO of the peak is only left out of the decision: it changes no measure, while
    subtracting it would turn stretches of digital silence (TTS output, edited files) into a faint
    constant that a blind SNR estimate reads as noise.
    """
    offset = float(np.mean(mono, dtype=np.float64))
    centred = (mono - np.float32(offset)).astype(np.float32, copy=False)
    peak = float(np.max(np.abs(centred)))
    peak_db = 20 * np.log10(peak) if peak > 0 else -np.inf
    if peak_db < config.silence_dbfs:
        dc = f" after removing a DC offset of {offset:+.3g}" if abs(offset) >= 1e-4 else ""
        raise _fail(ReasonCode.silent,
                    f"{where}: peak {peak_db:.1f} dBFS{dc} < audio.silence_dbfs={config.silence_dbfs}")
    return centred if abs(offset) >= DC_MIN_RATIO * peak else mono


def require_speech(speech_s: float | None, where: str, config: AudioConfig) -> None:
    """`no_speech` when the VAD found less than `audio.min_speech_s` of speech (a click in digital
    silence, hum, a tone burst). Called for clips of speech sources only (`sources[].speech`)."""
    found = speech_s or 0.0
    if found < config.min_speech_s:
        raise _fail(ReasonCode.no_speech,
                    f"{where}: the VAD found {found:.2f} s of speech < audio.min_speech_s={config.min_speech_s}; "
                    "if this source is not speech (sound, music), set sources[].speech: false")


def _read_soundfile(data: bytes, where: str, config: AudioConfig,
                    path: Path | None = None) -> tuple[np.ndarray, int] | None:
    """(frames × channels float32, rate) via libsndfile, or None when it does not know the format.

    A header whose length cannot be trusted (none, or more samples than the bytes can hold) is
    measured by ffmpeg decoding at most max_duration_s + 1 s, its header's length ignored."""
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None  # not a libsndfile format (or not audio): ffmpeg's turn
    if info.frames <= 0 or info.samplerate <= 0:
        raise _fail(ReasonCode.empty, f"{where}: no audio frames")
    if not _plausible_length(info, len(data)):
        if ffmpeg_tools() is None:
            raise _fail(ReasonCode.unreadable,
                        f"{where}: its header states no length (written through a pipe?) and ffmpeg is not installed "
                        "to measure it; install ffmpeg, or re-encode the file (e.g. `sox in.flac out.flac`)")
        return _read_ffmpeg(data, where, config, path, trust_header=False)
    _refuse_long_header(info, where, config)
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise _fail(ReasonCode.unreadable, f"{where}: decoding failed ({_short(exc)}); file may be truncated") from None
    return samples, int(sr)


def _read_ffmpeg(data: bytes, where: str, config: AudioConfig, path: Path | None,
                 trust_header: bool = True) -> tuple[np.ndarray, int]:
    """Probe the header, then decode at most max_duration_s + 1 s of the first audio stream
    (`trust_header=False`: the header's duration is ignored, only the decoded length counts)."""
    tools = ffmpeg_tools()
    if tools is None:
        raise _fail(ReasonCode.unreadable,
                    f"{where}: not a WAV/FLAC/OGG/MP3 file and ffmpeg is not installed to decode it; "
                    "install ffmpeg (apt-get install ffmpeg) or re-encode the corpus as FLAC")
    if path is not None:
        return _decode_file(tools, path, where, config, trust_header)
    with tempfile.NamedTemporaryFile(prefix="speechpairs-", suffix=".audio") as tmp:
        tmp.write(data)
        tmp.flush()
        return _decode_file(tools, Path(tmp.name), where, config, trust_header)


def _decode_file(tools: tuple[str, str], path: Path, where: str, config: AudioConfig,
                 trust_header: bool = True) -> tuple[np.ndarray, int]:
    ffmpeg, ffprobe = tools
    # `file:` keeps a name starting with '-' from reading as an option; whitelists keep ffmpeg local.
    source = ["-protocol_whitelist", "file", "-format_whitelist", FFMPEG_FORMATS, "-i", f"file:{path}"]
    probed = probe(ffprobe, source, where, PROBE_TIMEOUT_S)
    sr, channels = probed.sampling_rate, probed.channels
    declared = probed.duration_s if trust_header else None
    if declared is not None and declared > config.max_duration_s:
        raise _fail(ReasonCode.too_long, f"{where}: {declared:.2f} s (container header) > "
                                         f"audio.max_duration_s={config.max_duration_s}; split the clip")
    cap = config.max_duration_s + 1.0
    decoded = run([ffmpeg, "-nostdin", "-hide_banner", "-v", "error", *source, "-map", "0:a:0", "-vn", "-sn",
                   "-dn", "-t", f"{cap:.3f}", "-ac", str(channels), "-ar", str(sr), "-c:a", "pcm_f32le",
                   "-f", "f32le", "pipe:1"],
                  DECODE_TIMEOUT_S + cap / 10, where)
    errors = error_lines(decoded.stderr, source[-1])
    if decoded.returncode != 0:
        raise _fail(ReasonCode.unreadable, f"{where}: ffmpeg could not decode it ({errors or 'no detail'}); {FIX}")
    usable = len(decoded.stdout) // (4 * channels) * 4 * channels
    samples = np.frombuffer(decoded.stdout[:usable], dtype="<f4").astype(np.float32).reshape(-1, channels)
    seconds = samples.shape[0] / sr
    if declared is None and seconds >= cap - 0.5:
        header = "declares no duration" if trust_header else "states no plausible length"
        raise _fail(ReasonCode.too_long, f"{where}: longer than audio.max_duration_s={config.max_duration_s} "
                                         f"(its header {header}; decoding stopped at {cap:.0f} s); "
                                         "split the clip")
    if errors and declared is not None and seconds < 0.9 * declared - 0.1:
        # A file cut short (partial download): the header promises more than the data holds.
        raise _fail(ReasonCode.unreadable,
                    f"{where}: truncated or corrupt: decoded {seconds:.2f} s of the {declared:.2f} s its header "
                    f"declares ({errors}); re-download or re-encode the file")
    return samples, sr


def audio_name(clip_id: str, fmt: str) -> str:
    """The stored clip's file name (`audio.path`): its id without the corpus, with the format's suffix."""
    return f"{clip_id.split('/', 1)[-1]}.{fmt}"


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
