"""The ffmpeg and ffprobe child processes, one home for short clips (tasks/audio.py) and long
recordings (tasks/segment/blocks.py): finding the tools, running one under a timeout, the lines of
its log worth a message, and the header probe both read before decoding anything.

ffmpeg runs as a child process so a hostile file can neither hang the run (every call has a
timeout) nor crash the worker; its input is confined to the audio demuxers in `FFMPEG_FORMATS`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from schemas.records import QuarantineError, ReasonCode, Stage

# Demuxers ffmpeg may use: audio containers only. Playlists (hls), concat lists and the like
# would let a file named .m4a make ffmpeg open other files or URLs.
FFMPEG_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,asf,aac,ogg,mp3,wav,w64,flac,aiff,caf,au,amr,wv")
MAX_CHANNELS = 64
MAX_SAMPLING_RATE = 768_000
FIX = "check it with `ffprobe <file>` and re-encode it (e.g. to FLAC) or remove it from the corpus"


def _fail(reason: ReasonCode, message: str) -> QuarantineError:
    return QuarantineError(Stage.audio, reason, message)


@lru_cache(maxsize=1)
def ffmpeg_tools() -> tuple[str, str] | None:
    """(ffmpeg, ffprobe) paths, or None when either is missing."""
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    return (ffmpeg, ffprobe) if ffmpeg and ffprobe else None


@dataclass(frozen=True)
class Probe:
    """What a container header says about its first audio stream, before any sample is decoded."""

    sampling_rate: int
    channels: int
    duration_s: float | None  # the format's duration, else the stream's; None when it declares none


def probe(ffprobe: str, source: list[str], where: str, timeout: float,
          env: dict[str, str] | None = None) -> Probe:
    """ffprobe of the first audio stream of ffmpeg input `source` (its input arguments, `-i <input>`
    last). QuarantineError (`unreadable`) when ffprobe fails or times out, there is no audio stream,
    or its rate or channel count is implausible."""
    done = run([ffprobe, "-v", "error", *source, "-select_streams", "a:0",
                "-show_entries", "format=duration:stream=sample_rate,channels,duration", "-of", "json"],
               timeout, where, env)
    if done.returncode != 0:
        raise _fail(ReasonCode.unreadable,
                    f"{where}: not decodable audio ({error_lines(done.stderr, source[-1]) or 'ffprobe failed'}); {FIX}")
    try:
        info: dict[str, Any] = json.loads(done.stdout or b"{}")
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
    return Probe(sr, channels, _float(fmt.get("duration")) or _float(stream.get("duration")))


def run(cmd: list[str], timeout: float, where: str,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """`cmd` run to completion with its output captured; a timeout or a failure to start is
    `unreadable`, naming the tool."""
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False,
                              env=env)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise _fail(ReasonCode.unreadable, f"{where}: {Path(cmd[0]).name} did not finish within {timeout:g} s "
                                           f"(a malformed or hostile file?); {FIX}") from None
    except OSError as exc:
        raise _fail(ReasonCode.unreadable, f"{where}: cannot run {Path(cmd[0]).name} ({exc.strerror}); "
                                           "check the ffmpeg installation") from None


_LOG_PREFIX = re.compile(r"^\[[^\]]*@ 0x[0-9a-fA-F]+\]\s*")


def error_lines(stderr: bytes, shown: str) -> str:
    """The first two distinct lines ffmpeg logged, without its `[demuxer @ 0x…]` prefixes or the
    input it was given (`shown`, e.g. `file:<path>` or the relay's URL)."""
    lines: list[str] = []
    for raw in stderr.decode("utf-8", errors="replace").splitlines():
        line = _LOG_PREFIX.sub("", raw).replace(f"{shown}: ", "").replace(shown, "input").strip()
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
    return number if math.isfinite(number) and number > 0 else None
