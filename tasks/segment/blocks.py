"""Bounded-memory reading of long recordings: 16 kHz mono float32 blocks, and one span later.

A 3-hour file is never held whole: WAV/FLAC/OGG (and the other libsndfile containers) are read
block by block and resampled by one `soxr.ResampleStream`, so the filter state runs on across
block joins; MP3, M4A and everything else stream out of an `ffmpeg` child process through a pipe at
their own rate, read in block-sized chunks (ffmpeg downmixes, the same soxr stream resamples, so a
span read later by `read_segment` lands on the very samples the VAD saw). Every block has exactly `block_s`
seconds of samples except the last, which is shorter.

The hostile-file rules of tasks/audio.py apply: only regular files within `max_file_bytes` are
opened, ffmpeg is confined to audio demuxers and to a local file (or the loopback relay), and
a child that stops producing output for `IDLE_TIMEOUT_S` is killed. `open_source` is the one place
that turns a URI into a seekable binary file.

Remote recordings (s3://, http(s)://, issue 14) are never copied to local disk and never read
whole: the object is stat'ed first (`max_file_bytes` applies before any byte is read), then
libsndfile reads it through a `RangeFile` fetching `REMOTE_BUFFER_BYTES` windows (one range GET per
MiB as blocks stream; a header alone is one 64 KiB GET, a span one or a few GETs). ffmpeg never gets the
S3 credentials or the remote URL: it reads the object through the loopback relay of
tasks/segment/relay.py, one per ffmpeg/ffprobe call. ffprobe is tasks/ffmpeg.py's header probe, the
one short clips get.
"""

from __future__ import annotations

import math
import os
import selectors
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal

import numpy as np
import soundfile as sf
import soxr

from schemas.records import QuarantineError, ReasonCode, Stage
from storage import sources as stores
from tasks.audio import DEFAULT_MAX_FILE_BYTES, open_regular, remote_failure, too_large
from tasks.ffmpeg import FFMPEG_FORMATS, ffmpeg_tools, probe
from tasks.segment.relay import Relay

SR = 16_000
DEFAULT_BLOCK_S = 30.0
IDLE_TIMEOUT_S = 30.0  # an ffmpeg child silent this long on a pipe is stuck on a hostile file
# libsndfile containers read block by block (seekable, exact frame counts); MP3 goes to ffmpeg,
# whose seeking and frame accounting for it are the reliable ones.
SOUNDFILE_FORMATS = frozenset({"WAV", "WAVEX", "W64", "RF64", "FLAC", "OGG", "AIFF", "CAF", "AU"})
SEEK_MARGIN_S = 0.05  # extra input read on each side of a span so the resampler's edges fall outside it
# Decoded and dropped before a span read through ffmpeg: an MP3 frame needs the bit reservoir of the
# frames before it (with 0.05 s the first ~30 ms differ from the streamed samples; from 0.3 s, none).
FFMPEG_PREROLL_S = 0.5
Reader = Literal["soundfile", "ffmpeg"]
REMOTE_BUFFER_BYTES = 1 << 20  # libsndfile reads of a remote object: one range GET per MiB
HEADER_WINDOW_BYTES = 64 << 10  # a remote header (recording_info, planning): one 64 KiB range GET
# Proxy variables ffmpeg's http client would obey; its only peer is the loopback relay.
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def _fail(reason: ReasonCode, message: str) -> QuarantineError:
    return QuarantineError(Stage.audio, reason, message)


@dataclass(frozen=True)
class RecordingInfo:
    """What the header says, before any sample is decoded (planning and the `segment: auto` rule)."""

    duration_s: float
    sampling_rate: int
    channels: int
    reader: Reader


def local_path(uri: str) -> Path:
    """The local path of a `file://` URI or plain path; other schemes are refused with the fix."""
    if "://" in uri and not uri.startswith("file://"):
        raise _fail(ReasonCode.unreadable, f"{uri}: only local paths, s3:// and http(s):// URIs are read; "
                                           "fix the path")
    return Path(uri.removeprefix("file://"))


class _RemoteFile(stores.RangeFile):
    """A remote object as a seekable file for libsndfile: reads are range reads of at least
    `window` bytes, the last one kept (seeks, including libsndfile's seek to the end for the
    length, cost nothing; memory is one window or one read). Reads are filled completely (libsndfile
    takes a short read for the end of the file). A failed range read is remembered in `error`
    rather than raised, since soundfile's read callback would swallow it: every caller checks it
    with `_check_remote` after each soundfile call."""

    def __init__(self, store: stores.SourceStore, uri: str, size: int, window: int) -> None:
        super().__init__(store, uri, size)
        self.window = window
        self.error: stores.SourceReadError | None = None
        self._at, self._data = 0, b""

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size and self.error is None:
            offset = self.pos - self._at
            if not 0 <= offset < len(self._data):
                end = min(self.size, self.pos + max(len(view) - done, self.window))
                try:
                    data = self.store.read(self.uri, self.pos, end)
                except stores.SourceReadError as exc:
                    self.error = exc
                    break
                if not data:
                    self.error = stores.SourceReadError(
                        "unreadable", self.uri, f"{self.uri}: the object ended at byte {self.pos:,} of the "
                                                f"{self.size:,} it had when opened; it changed while being read")
                    break
                self._at, self._data, offset = self.pos, data, 0
            n = min(len(view) - done, len(self._data) - offset)
            view[done:done + n] = self._data[offset:offset + n]
            done += n
            self.pos += n
        return done


def _remote(uri: str, max_bytes: int | None) -> tuple[stores.SourceStore, int]:
    """(the source's store, the object's size), the size cap checked before any byte is read."""
    try:
        store = stores.store_for(uri)
        size = store.stat(uri).size
    except stores.SourceReadError as exc:
        raise remote_failure(exc, exc.uri, max_bytes) from None
    if max_bytes is not None and size > max_bytes:
        raise too_large(size, max_bytes, uri)
    return store, size


def open_source(uri: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
                window: int = REMOTE_BUFFER_BYTES) -> tuple[BinaryIO, int]:
    """(seekable binary file, size): a local regular file, or a remote object whose reads are
    range reads of at least `window` bytes (never the whole object at once)."""
    if stores.is_remote(uri):
        store, size = _remote(uri, max_bytes)
        return _RemoteFile(store, uri, size, window), size  # type: ignore[return-value]
    return open_regular(local_path(uri), uri, max_bytes)


def _check_remote(f: BinaryIO) -> None:
    """Raise the remote read failure a soundfile call swallowed (no-op for local files)."""
    error = getattr(f, "error", None)
    if isinstance(error, stores.SourceReadError):
        raise remote_failure(error, error.uri, None)


def _soundfile_info(f: BinaryIO) -> sf._SoundFileInfo | None:
    try:
        info = sf.info(f)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
        info = None
    finally:
        f.seek(0)
    _check_remote(f)
    if info is None:
        return None
    if info.format not in SOUNDFILE_FORMATS or not (0 < info.frames < 2**62) or info.samplerate <= 0:
        return None  # MP3, or a header without a trustworthy length: ffmpeg measures it
    return info


def recording_info(uri: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> RecordingInfo:
    """Duration, rate, channels and which reader streams it; QuarantineError when not audio."""
    f, _ = open_source(uri, max_bytes, HEADER_WINDOW_BYTES)
    with f:
        info = _soundfile_info(f)
    if info is not None:
        return RecordingInfo(info.frames / info.samplerate, int(info.samplerate), int(info.channels), "soundfile")
    with _ffmpeg_input(uri, max_bytes) as source:
        duration, rate, channels = _ffprobe(source, uri)
    return RecordingInfo(duration, rate, channels, "ffmpeg")


def header_duration(uri: str, size: int) -> float | None:
    """The duration a libsndfile header states (WAV, FLAC, ...), else None; never raises. For planning:
    `size` comes from a listing or a stat, so a remote object costs one `HEADER_WINDOW_BYTES` range
    GET and no stat, and nothing falls back to ffprobe (MP3 and the like: None)."""
    try:
        if stores.is_remote(uri):
            f: BinaryIO = _RemoteFile(stores.store_for(uri), uri, size, HEADER_WINDOW_BYTES)  # type: ignore[assignment]
        else:
            f = open_regular(local_path(uri), uri, None)[0]
        with f:
            info = _soundfile_info(f)
    except (QuarantineError, OSError):
        return None
    return None if info is None else float(info.frames / info.samplerate)


def iter_blocks(uri: str, block_s: float = DEFAULT_BLOCK_S,
                max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> Iterator[np.ndarray]:
    """Consecutive 16 kHz mono float32 blocks of `block_s` seconds (the last one shorter)."""
    block = max(SILERO_SAFE_MIN, round(block_s * SR))
    f, _ = open_source(uri, max_bytes)
    with f:
        info = _soundfile_info(f)
        if info is not None:
            yield from _rechunk(_soundfile_blocks(f, info, uri, block), block)
            return
    with _ffmpeg_input(uri, max_bytes) as source:
        _, rate, _ = _ffprobe(source, uri)
        yield from _rechunk(_resampled(_ffmpeg_stream(source, uri, block, rate, 0.0, None), rate), block)


def _resampled(chunks: Iterator[np.ndarray], rate: int) -> Iterator[np.ndarray]:
    """16 kHz chunks from `rate` chunks through one soxr stream (the same resampler for every reader,
    so a span read later lands on the same samples)."""
    if rate == SR:
        yield from chunks
        return
    resampler = soxr.ResampleStream(rate, SR, 1, dtype="float32", quality="HQ")
    for chunk in chunks:
        out = resampler.resample_chunk(chunk)
        if len(out):
            yield out
    tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    if len(tail):
        yield tail


SILERO_SAFE_MIN = 512  # blocks shorter than one VAD frame only cost Python calls


def _soundfile_blocks(f: BinaryIO, info: sf._SoundFileInfo, uri: str, block: int) -> Iterator[np.ndarray]:
    rate = int(info.samplerate)
    resampler = None if rate == SR else soxr.ResampleStream(rate, SR, 1, dtype="float32", quality="HQ")
    frames_per_read = max(1, math.floor(block * rate / SR))
    try:
        with sf.SoundFile(f) as sound:
            while True:
                data = sound.read(frames_per_read, dtype="float32", always_2d=True)
                _check_remote(f)
                last = len(data) < frames_per_read
                mono = _mono(data, uri)
                if resampler is not None:
                    mono = resampler.resample_chunk(mono, last=last)
                if len(mono):
                    yield mono
                if last:
                    return
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise _fail(ReasonCode.unreadable, f"{uri}: decoding failed mid-file ({exc}); the file may be truncated: "
                                           "re-download or re-encode it") from None


def _mono(data: np.ndarray, uri: str) -> np.ndarray:
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise _fail(ReasonCode.non_finite, f"{uri}: NaN/Inf samples; re-export the recording")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _rechunk(chunks: Iterator[np.ndarray], block: int) -> Iterator[np.ndarray]:
    """Exactly `block` samples per yielded array (the last may be shorter); never more."""
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held < block:
            continue
        joined = np.concatenate(pending)
        n_full = len(joined) // block
        for i in range(n_full):
            yield joined[i * block:(i + 1) * block].copy()
        rest = joined[n_full * block:]
        pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if held:
        yield np.concatenate(pending)


def read_segment(uri: str, start_s: float, end_s: float,
                 max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> np.ndarray:
    """The 16 kHz mono samples of [start_s, end_s) of a recording: seek and read that span only.

    Sample k of the result is sample round(start_s * 16000) + k of the streamed recording (up to
    the resampler's rounding), so a segment's audio matches what the VAD saw."""
    if not 0 <= start_s < end_s:
        raise ValueError(f"read_segment: need 0 <= start_s < end_s, got {start_s}..{end_s}")
    first, count = round(start_s * SR), round((end_s - start_s) * SR)
    f, _ = open_source(uri, max_bytes)
    with f:
        info = _soundfile_info(f)
        if info is not None:
            samples = _soundfile_span(f, info, uri, first, count)
        else:
            samples = None
    if samples is None:
        with _ffmpeg_input(uri, max_bytes) as source:
            samples = _ffmpeg_span(source, uri, first, count)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _span_plan(rate: int, first: int, count: int, margin_s: float) -> tuple[int, int, int]:
    """(first input sample, input samples, output samples to skip) for output samples
    [first, first + count): the read starts on a sample shared by both rate grids, at least
    `margin_s` early, so the resampled span lands on the stream's own 16 kHz grid."""
    period_in = rate // math.gcd(rate, SR)
    period_out = SR // math.gcd(rate, SR)
    margin_periods = math.ceil(margin_s * rate / period_in)
    start_period = max(0, first // period_out - margin_periods)
    skip = first - start_period * period_out
    in_count = math.ceil((skip + count) * rate / SR) + margin_periods * period_in
    return start_period * period_in, in_count, skip


def _soundfile_span(f: BinaryIO, info: sf._SoundFileInfo, uri: str, first: int, count: int) -> np.ndarray:
    rate = int(info.samplerate)
    in_start, in_count, skip = _span_plan(rate, first, count, SEEK_MARGIN_S if rate != SR else 0.0)
    with sf.SoundFile(f) as sound:
        sound.seek(min(in_start, sound.frames))
        data = sound.read(in_count, dtype="float32", always_2d=True)
        _check_remote(f)
        mono = _mono(data, uri)
    out = np.concatenate(list(_resampled(iter([mono]), rate))) if len(mono) else mono
    return out[skip: skip + count]


def _ffmpeg_span(source: _FfmpegInput, uri: str, first: int, count: int) -> np.ndarray:
    _, rate, _ = _ffprobe(source, uri)
    in_start, in_count, skip = _span_plan(rate, first, count, FFMPEG_PREROLL_S)
    chunks = _ffmpeg_stream(source, uri, 1 << 20, rate, in_start / rate, in_count / rate)
    pieces = list(_resampled(chunks, rate))
    out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return out[skip: skip + count]


@dataclass
class _FfmpegInput:
    """ffmpeg's input arguments for one recording, and the relay serving it when it is remote."""

    args: list[str]
    relay: Relay | None = None
    env: dict[str, str] | None = field(default=None, repr=False)

    def check(self) -> None:
        """Raise the remote read failure the relay hit (ffmpeg may have taken it for the end)."""
        if self.relay is not None and self.relay.error is not None:
            raise remote_failure(self.relay.error, self.relay.error.uri, None)


@contextmanager
def _ffmpeg_input(uri: str, max_bytes: int | None) -> Iterator[_FfmpegInput]:
    """A local file as `file:<path>`; a remote object through a loopback relay for this call only."""
    if not stores.is_remote(uri):
        path = local_path(uri)
        yield _FfmpegInput(["-protocol_whitelist", "file", "-format_whitelist", FFMPEG_FORMATS, "-i", f"file:{path}"])
        return
    store, size = _remote(uri, max_bytes)
    relay = Relay(store, uri, size)
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    try:
        yield _FfmpegInput(["-protocol_whitelist", "http,tcp", "-format_whitelist", FFMPEG_FORMATS,
                            "-i", relay.url], relay, env)
    finally:
        relay.close()


def _need_ffmpeg(uri: str) -> tuple[str, str]:
    tools = ffmpeg_tools()
    if tools is None:
        raise _fail(ReasonCode.unreadable, f"{uri}: not a WAV/FLAC/OGG file and ffmpeg is not installed to stream "
                                           "it; install ffmpeg (apt-get install ffmpeg) or re-encode it as FLAC")
    return tools


def _ffprobe(source: _FfmpegInput, uri: str) -> tuple[float, int, int]:
    """(duration, rate, channels) from the container header (tasks/ffmpeg.py's probe, the short
    clips' one too); a relay failure is raised before what ffprobe made of it."""
    _, ffprobe = _need_ffmpeg(uri)
    try:
        probed = probe(ffprobe, source.args, uri, IDLE_TIMEOUT_S, source.env)
    except QuarantineError:
        source.check()
        raise
    source.check()
    if probed.duration_s is None:
        raise _fail(ReasonCode.unreadable, f"{uri}: the container declares no duration; check it with `ffprobe` "
                                           "and re-encode it (e.g. to FLAC)")
    return probed.duration_s, probed.sampling_rate, probed.channels


def _ffmpeg_stream(source: _FfmpegInput, uri: str, block: int, rate: int, start_s: float,
                   duration_s: float | None) -> Iterator[np.ndarray]:
    """Mono float32 chunks at the source `rate` (ffmpeg downmixes; soxr resamples, as for
    libsndfile files) of at most `block` samples from an ffmpeg pipe."""
    ffmpeg, _ = _need_ffmpeg(uri)
    seek = ["-ss", f"{start_s:.6f}"] if start_s > 0 else []
    limit = ["-t", f"{duration_s:.6f}"] if duration_s is not None else []
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", *seek, *source.args, *limit,
           "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(rate), "-c:a", "pcm_f32le", "-f", "f32le",
           "pipe:1"]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                env=source.env)
        assert proc.stdout is not None
        try:
            yield from _read_pipe(proc.stdout, uri, block)
            code = proc.wait(timeout=IDLE_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        source.check()
        if code != 0:
            errors.seek(0)
            detail = errors.read(400).decode(errors="replace").strip().replace("\n", "; ")
            raise _fail(ReasonCode.unreadable, f"{uri}: ffmpeg could not decode it ({detail or f'exit {code}'}); "
                                               "check it with `ffprobe` and re-encode it (e.g. to FLAC)")


def _read_pipe(pipe: IO[bytes], uri: str, block: int) -> Iterator[np.ndarray]:
    want = 4 * block
    fd = pipe.fileno()
    carry = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            buf = bytearray(carry)
            eof = False
            while len(buf) < want:
                if not selector.select(IDLE_TIMEOUT_S):
                    raise _fail(ReasonCode.unreadable, f"{uri}: ffmpeg produced nothing for {IDLE_TIMEOUT_S:g} s "
                                                       "(a malformed or hostile file?); check it with `ffprobe`")
                data = os.read(fd, want - len(buf))
                if not data:
                    eof = True
                    break
                buf += data
            usable = len(buf) // 4 * 4
            carry = bytes(buf[usable:])
            if usable:
                yield np.frombuffer(bytes(buf[:usable]), dtype="<f4").astype(np.float32)
            if eof:
                return
