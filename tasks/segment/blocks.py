"""Bounded-memory reading of long recordings: 16 kHz mono float32 blocks, and one span later.

A 3-hour file is never held whole: WAV/FLAC/OGG (and the other libsndfile containers) are read
block by block and resampled by one `soxr.ResampleStream`, so the filter state runs on across
block joins; MP3, M4A and everything else stream out of an `ffmpeg` child process through a pipe at
their own rate, read in block-sized chunks (ffmpeg downmixes, the same soxr stream resamples, so a
span read later by `read_segment` lands on the very samples the VAD saw). Every block has exactly `block_s`
seconds of samples except the last, which is shorter.

The hostile-file rules of tasks/audio.py apply: only regular files within `max_file_bytes` are
opened, ffmpeg is confined to local files and audio demuxers, and a child that stops producing
output for `IDLE_TIMEOUT_S` is killed. `open_source` is the one place that turns a URI into a
seekable binary file: a remote source (s3://, http(s)://, range reads) plugs in there.
"""

from __future__ import annotations

import math
import os
import selectors
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Literal

import numpy as np
import soundfile as sf
import soxr

from schemas.records import QuarantineError, ReasonCode, Stage
from tasks.audio import DEFAULT_MAX_FILE_BYTES, FFMPEG_FORMATS, ffmpeg_tools, open_regular

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
    """The local path of a `file://` URI or plain path; remote URIs are refused with the fix."""
    if "://" in uri and not uri.startswith("file://"):
        raise _fail(ReasonCode.unreadable, f"{uri}: long recordings are read from local files only for now; "
                                           "copy the recording locally")
    return Path(uri.removeprefix("file://"))


def open_source(uri: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> tuple[BinaryIO, int]:
    """(seekable binary file, size): the seam where a remote source's range-read file plugs in."""
    return open_regular(local_path(uri), uri, max_bytes)


def _soundfile_info(f: BinaryIO) -> sf._SoundFileInfo | None:
    try:
        info = sf.info(f)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError):
        return None
    finally:
        f.seek(0)
    if info.format not in SOUNDFILE_FORMATS or not (0 < info.frames < 2**62) or info.samplerate <= 0:
        return None  # MP3, or a header without a trustworthy length: ffmpeg measures it
    return info


def recording_info(uri: str, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> RecordingInfo:
    """Duration, rate, channels and which reader streams it; QuarantineError when not audio."""
    f, _ = open_source(uri, max_bytes)
    with f:
        info = _soundfile_info(f)
    if info is not None:
        return RecordingInfo(info.frames / info.samplerate, int(info.samplerate), int(info.channels), "soundfile")
    duration, rate, channels = _ffprobe(local_path(uri), uri)
    return RecordingInfo(duration, rate, channels, "ffmpeg")


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
    _, rate, _ = _ffprobe(local_path(uri), uri)
    yield from _rechunk(_resampled(_ffmpeg_stream(local_path(uri), uri, block, rate, 0.0, None), rate), block)


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
            samples = _ffmpeg_span(local_path(uri), uri, first, count)
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
        mono = _mono(sound.read(in_count, dtype="float32", always_2d=True), uri)
    out = np.concatenate(list(_resampled(iter([mono]), rate))) if len(mono) else mono
    return out[skip: skip + count]


def _ffmpeg_span(path: Path, uri: str, first: int, count: int) -> np.ndarray:
    _, rate, _ = _ffprobe(path, uri)
    in_start, in_count, skip = _span_plan(rate, first, count, FFMPEG_PREROLL_S)
    chunks = _ffmpeg_stream(path, uri, 1 << 20, rate, in_start / rate, in_count / rate)
    pieces = list(_resampled(chunks, rate))
    out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return out[skip: skip + count]


def _ffmpeg_cmd(path: Path) -> list[str]:
    return ["-protocol_whitelist", "file", "-format_whitelist", FFMPEG_FORMATS, "-i", f"file:{path}"]


def _need_ffmpeg(uri: str) -> tuple[str, str]:
    tools = ffmpeg_tools()
    if tools is None:
        raise _fail(ReasonCode.unreadable, f"{uri}: not a WAV/FLAC/OGG file and ffmpeg is not installed to stream "
                                           "it; install ffmpeg (apt-get install ffmpeg) or re-encode it as FLAC")
    return tools


def _ffprobe(path: Path, uri: str) -> tuple[float, int, int]:
    _, ffprobe = _need_ffmpeg(uri)
    cmd = [ffprobe, "-v", "error", *_ffmpeg_cmd(path), "-select_streams", "a:0",
           "-show_entries", "format=duration:stream=sample_rate,channels", "-of", "csv=p=0"]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=IDLE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise _fail(ReasonCode.unreadable, f"{uri}: ffprobe did not finish within {IDLE_TIMEOUT_S:g} s; "
                                           "check the file with `ffprobe`") from None
    fields = [v for line in done.stdout.decode(errors="replace").split() for v in line.split(",") if v]
    try:
        rate, channels, duration = int(fields[0]), int(fields[1]), float(fields[2])
    except (IndexError, ValueError):
        raise _fail(ReasonCode.unreadable, f"{uri}: no audio stream with a duration "
                                           f"({done.stderr.decode(errors='replace').strip()[:160] or 'ffprobe'}); "
                                           "check it with `ffprobe` and re-encode it (e.g. to FLAC)") from None
    return duration, rate, channels


def _ffmpeg_stream(path: Path, uri: str, block: int, rate: int, start_s: float,
                   duration_s: float | None) -> Iterator[np.ndarray]:
    """Mono float32 chunks at the source `rate` (ffmpeg downmixes; soxr resamples, as for
    libsndfile files) of at most `block` samples from an ffmpeg pipe."""
    ffmpeg, _ = _need_ffmpeg(uri)
    seek = ["-ss", f"{start_s:.6f}"] if start_s > 0 else []
    limit = ["-t", f"{duration_s:.6f}"] if duration_s is not None else []
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", *seek, *_ffmpeg_cmd(path), *limit,
           "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(rate), "-c:a", "pcm_f32le", "-f", "f32le",
           "pipe:1"]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdout is not None
        try:
            yield from _read_pipe(proc.stdout, uri, block)
            code = proc.wait(timeout=IDLE_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
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
