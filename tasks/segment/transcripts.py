"""Timestamped transcripts of long recordings, read into one model and cut to a segment's span.

A long recording is cut into segments (`tasks.segment.cut`); where it has a timestamped transcript
each segment takes the words inside its span, and the cutter prefers to cut between cues
(`cue_boundaries`). Formats (`FORMATS`): SRT, WebVTT, Praat TextGrid (both text forms: tasks.segment.textgrid),
CTM, lhotse supervisions or cut sets (JSON list or JSONL[.gz]) and Whisper-style JSON. All become `Cue`s sorted
by start, each with its words when the format times them (TextGrid word tiers, CTM, lhotse word
alignments, Whisper `words`). Word-only formats (a TextGrid words tier, CTM) group words into cues
at pauses: an empty interval, or any gap between consecutive words. The model and the span rules
(`text_in_span`, `cue_boundaries`) live in `tasks.segment.cues` and are re-exported here.

Transcripts are hostile input: every text and speaker passes the project's one sanitiser
(`tasks.llm.messages.sanitize_transcript`), sidecar files are read with a size cap, and a malformed
file raises `TranscriptError` naming the file, the line and what is wrong.
"""

from __future__ import annotations

import html
import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.ingest.files import read_small
from tasks.llm.messages import sanitize_transcript
from tasks.segment.cues import (
    PAUSE_MARKS,
    Cue,
    TranscriptError,
    Word,
    checked_span,
    cue_boundaries,
    group_words,
    sorted_cues,
    speaker_name,
    text_in_span,
)
from tasks.segment.textgrid import read_textgrid

__all__ = ["FORMATS", "MAX_SIDECAR_BYTES", "SIDECAR_SUFFIXES", "Cue", "TranscriptError", "Word", "cue_boundaries",
           "find_sidecar", "load_transcript", "text_in_span"]

FORMATS = ("srt", "vtt", "textgrid", "ctm", "lhotse", "whisper")
MAX_SIDECAR_BYTES = 64 * 1024 * 1024  # ~ a 1,000-hour CTM; a larger "transcript" is the wrong file
# Sidecar precedence: word-timed formats first (they cut at word level), then cue-level subtitles.
SIDECAR_SUFFIXES = (".TextGrid", ".ctm", ".json", ".vtt", ".srt")
_SUFFIX_FORMAT = {".srt": "srt", ".vtt": "vtt", ".textgrid": "textgrid", ".ctm": "ctm", ".jsonl": "lhotse"}


# ---------------------------------------------------------------------------------------------
# Entry points


def load_transcript(source: Path | str | bytes | Sequence[Mapping[str, Any]], fmt: str | None = None,
                    recording_id: str | None = None, *, name: str | None = None) -> list[Cue]:
    """Cues of a transcript file (a path), its bytes, or lhotse supervision dicts, sorted by start.

    `fmt` is one of FORMATS; None picks it from the suffix, else from the content. `recording_id`
    selects one recording of a CTM or supervisions file holding several (required then); other
    formats hold one recording. `name` labels errors for bytes input.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown transcript format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(source, (bytes, str, Path)):
        label = name or "<supervisions>"
        return sorted_cues(_lhotse(list(source), label, recording_id))
    if isinstance(source, bytes):
        label, data = name or "<transcript>", source
        if len(data) > MAX_SIDECAR_BYTES:
            raise TranscriptError(label, None, f"larger than {MAX_SIDECAR_BYTES:,} bytes; is it the right file?")
    else:
        path = Path(source)
        label, data = name or path.name, read_small(path, MAX_SIDECAR_BYTES)
    lower = label.lower()
    if lower.endswith(".gz"):
        data, lower = _gunzip(data, label), lower[:-3]
    text = _decode(data, label)
    fmt = fmt or _SUFFIX_FORMAT.get(Path(lower).suffix) or _sniff(text, label)
    if fmt == "lhotse":
        return sorted_cues(_lhotse_text(text, label, recording_id))
    parse = {"srt": _srt, "vtt": _vtt, "textgrid": read_textgrid, "whisper": _whisper}.get(fmt)
    if parse is not None:
        return sorted_cues(parse(text, label))
    return sorted_cues(_ctm(text, label, recording_id))


def find_sidecar(audio_path: Path | str) -> Path | None:
    """The timestamped transcript next to a local audio file: `<stem>` + the first of
    SIDECAR_SUFFIXES that exists as a regular file (suffix case ignored: `.textgrid`, `.SRT`).
    Word-timed formats win over subtitles: TextGrid, CTM, JSON, then WebVTT, then SRT. Remote
    audio (`s3://`, `http(s)://`) has no sidecar here: None."""
    if isinstance(audio_path, str) and "://" in audio_path:
        return None
    path = Path(audio_path)
    for suffix in SIDECAR_SUFFIXES:
        for variant in dict.fromkeys((suffix, suffix.lower(), suffix.upper())):
            candidate = path.with_suffix(variant)
            if candidate != path and candidate.is_file():
                return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Bytes to text, format detection, shared checks


def _gunzip(data: bytes, label: str) -> bytes:
    """A gzipped file inflated to at most MAX_SIDECAR_BYTES (a small bomb stays small)."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(data, MAX_SIDECAR_BYTES + 1)
    except zlib.error as e:
        raise TranscriptError(label, None, f"not a valid gzip file ({e})") from None
    if len(out) > MAX_SIDECAR_BYTES:
        raise TranscriptError(label, None, f"inflates to more than {MAX_SIDECAR_BYTES:,} bytes; is it the right file?")
    return out


def _decode(data: bytes, label: str) -> str:
    """UTF-8 (BOM optional) or UTF-16 (BOM, as Praat writes it; or none, told by its NUL bytes)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    elif len(data) >= 4 and data[1] == 0 and data[3] == 0 and data[0] and data[2]:
        encoding = "utf-16-le"
    elif len(data) >= 4 and data[0] == 0 and data[2] == 0 and data[1] and data[3]:
        encoding = "utf-16-be"
    else:
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1 if encoding == "utf-8-sig" else None
        raise TranscriptError(label, line, f"not {encoding.replace('-sig', '')} text (byte {e.start}); "
                                           "convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _sniff(text: str, label: str) -> str:
    head = text.lstrip("\ufeff \t\r\n")
    if head.startswith("WEBVTT"):
        return "vtt"
    if head.startswith("File type") and "ooTextFile" in head[:200]:
        return "textgrid"
    if head.startswith("[Script Info]"):
        raise TranscriptError(label, 1, "ASS/SSA subtitles are not read; convert them to SRT first, e.g. "
                                        "`ffmpeg -i talk.ass talk.srt`")
    if head.startswith(("{", "[")):  # lhotse supervisions have a duration, Whisper segments an end
        return "lhotse" if '"duration"' in head and '"segments"' not in head else "whisper"
    lines = _lines(head)
    timing = next((ln for ln in lines[:3] if "-->" in ln), None)
    if timing is not None:
        return "srt"
    first = next((ln for ln in lines if ln.strip() and not ln.startswith(";;")), "")
    fields = first.split()
    if len(fields) >= 5 and all(_is_number(f) for f in fields[2:4]):
        return "ctm"
    raise TranscriptError(label, None, "unknown transcript format; name it .srt, .vtt, .TextGrid, .ctm, .json "
                                       f"or .jsonl, or pass fmt= (one of {', '.join(FORMATS)})")


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def _lines(text: str) -> list[str]:
    """Lines split on CR, LF or CRLF only (what editors number), not on U+2028 and friends."""
    return re.split(r"\r\n|\r|\n", text)


# ---------------------------------------------------------------------------------------------
# SRT and WebVTT

_CLOCK = re.compile(r"(?:(\d+):)?([0-5]?\d):([0-5]\d)(?:[.,](\d{1,3}))?")
_TIMING = re.compile(r"^\s*(\S+)\s*-->\s*(\S+)(?:\s+(.*))?$")
_TAG = re.compile(r"</?[A-Za-z0-9][^<>\n]*>|\{\\[^{}\n]*\}")  # <i>, <font ...>, <00:01.000>; ASS {\an8}
_VOICE = re.compile(r"<v(?:\.[^\s>]*)?\s+([^>]*)>")


def _clock(token: str, label: str, line: int, hours_required: bool) -> float:
    m = _CLOCK.fullmatch(token)
    if m is None or (hours_required and m.group(1) is None):
        form = "HH:MM:SS,mmm" if hours_required else "[HH:]MM:SS.mmm"
        raise TranscriptError(label, line, f"timestamp {token!r} is not {form}")
    hours, minutes, seconds, frac = m.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + (int(frac.ljust(3, "0")) / 1000 if frac else 0)


def _blocks(lines: list[str], first: int = 0) -> list[tuple[int, list[str]]]:
    """Runs of non-blank lines with the 1-based number of their first line."""
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    for i in range(first, len(lines)):
        if lines[i].strip():
            if not current:
                blocks.append((i + 1, current))
            current.append(lines[i])
        else:
            current = []
    return blocks


def _timed_block(block: list[str], at: int, label: str, vtt: bool) -> tuple[int, float, float, list[str]]:
    """(timing line number, start, end, text lines) of a cue block: [identifier], timing, text."""
    index = 0 if "-->" in block[0] else 1 if len(block) > 1 and "-->" in block[1] else -1
    if index < 0:
        raise TranscriptError(label, at, f"expected a timing line 'start --> end' in the cue starting {block[0]!r}")
    line = at + index
    m = _TIMING.match(block[index])
    if m is None:
        raise TranscriptError(label, line, f"timing line {block[index]!r} is not 'start --> end'")
    start = _clock(m.group(1), label, line, hours_required=not vtt)
    end = _clock(m.group(2), label, line, hours_required=not vtt)
    if end < start:
        raise TranscriptError(label, line, f"end {m.group(2)} is before start {m.group(1)}")
    return line, start, end, block[index + 1:]


def _cue_text(lines: list[str]) -> str:
    return sanitize_transcript(html.unescape(_TAG.sub("", " ".join(lines))))


def _srt(text: str, label: str) -> list[Cue]:
    cues = []
    for at, block in _blocks(_lines(text)):
        _, start, end, body = _timed_block(block, at, label, vtt=False)
        if words := _cue_text(body):
            cues.append(Cue(start, end, words))
    return cues


def _vtt(text: str, label: str) -> list[Cue]:
    lines = _lines(text)
    if not lines[0].lstrip("\ufeff").startswith("WEBVTT"):
        raise TranscriptError(label, 1, "a WebVTT file starts with 'WEBVTT'")
    header_end = next((i for i, ln in enumerate(lines) if not ln.strip()), len(lines))
    cues = []
    for at, block in _blocks(lines, header_end):
        keyword = block[0].split(maxsplit=1)[0] if block[0].split() else ""
        if keyword in ("NOTE", "STYLE", "REGION") and "-->" not in block[0]:
            continue
        _, start, end, body = _timed_block(block, at, label, vtt=True)
        voice = _VOICE.search(" ".join(body))
        if words := _cue_text(body):
            cues.append(Cue(start, end, words, speaker_name(voice.group(1)) if voice else None))
    return cues


# ---------------------------------------------------------------------------------------------
# CTM


def _ctm(text: str, label: str, recording_id: str | None) -> list[Cue]:
    """`<file> <channel> <start> <duration> <word> [confidence ...]`; `;;` lines are comments."""
    by_file: dict[str, list[tuple[str, Word]]] = {}
    for number, line in enumerate(_lines(text), 1):
        if not line.strip() or line.lstrip().startswith(";;"):
            continue
        fields = line.split()
        if len(fields) < 5:
            raise TranscriptError(label, number, f"a CTM line has 5 or more fields "
                                                 f"(file channel start duration word [conf]), found {len(fields)}")
        if recording_id is not None and fields[0] != recording_id:
            continue
        try:
            start, duration = float(fields[2]), float(fields[3])
        except ValueError:
            raise TranscriptError(label, number, f"start {fields[2]!r} or duration {fields[3]!r} is not a number") from None
        if duration < 0:
            raise TranscriptError(label, number, f"duration {fields[3]} is negative")
        checked_span(label, number, start, start + duration)
        if word := sanitize_transcript(fields[4]):
            by_file.setdefault(fields[0], []).append((fields[1], Word(start, start + duration, word)))
    if len(by_file) > 1:
        names = ", ".join(sorted(by_file)[:5])
        raise TranscriptError(label, None, f"holds {len(by_file)} recordings ({names}, ...); pass recording_id")
    cues: list[Cue] = []
    for entries in by_file.values():
        for channel in sorted({c for c, _ in entries}):
            words = sorted((w for c, w in entries if c == channel), key=lambda w: (w.start_s, w.end_s))
            cues.extend(group_words(words))
    return cues


# ---------------------------------------------------------------------------------------------
# JSON: lhotse supervisions and Whisper-style segments


def _json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TranscriptError(label, e.lineno, f"not valid JSON: {e.msg} (column {e.colno})") from None


def _json_line(line: str, label: str, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise TranscriptError(label, number, f"not valid JSON: {e.msg} (column {e.colno})") from None


def _number(item: Mapping[str, Any], key: str, label: str, where: int | str) -> float:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TranscriptError(label, where, f"{key!r} must be a finite number of seconds, found {value!r}")
    return float(value)


def _lhotse_text(text: str, label: str, recording_id: str | None) -> list[Cue]:
    """A JSON list of supervisions, or JSONL (one supervision per line, line numbers kept)."""
    if text.lstrip().startswith("["):
        items = _json(text, label)
        return _lhotse(items, label, recording_id)
    numbers = [n for n, line in enumerate(_lines(text), 1) if line.strip()]
    lines = _lines(text)
    return _lhotse([_json_line(lines[n - 1], label, n) for n in numbers], label, recording_id, numbers)


def _lhotse(items: Any, label: str, recording_id: str | None, lines: list[int] | None = None) -> list[Cue]:
    if not isinstance(items, list):
        raise TranscriptError(label, None, "lhotse supervisions are a list of objects or JSONL lines")
    cues_by_recording: dict[str, list[Cue]] = {}
    for where, item in _supervision_items(items, label, lines):
        rec = str(item.get("recording_id", ""))
        if recording_id is not None and rec != recording_id:
            continue
        start = _number(item, "start", label, where)
        start, end = checked_span(label, where, start, start + _number(item, "duration", label, where))
        words = _alignment(item.get("alignment"), label, where)
        text = sanitize_transcript(item.get("text")) or " ".join(w.text for w in words)
        if text:
            cues_by_recording.setdefault(rec, []).append(Cue(start, end, text, speaker_name(item.get("speaker")), words))
    if len(cues_by_recording) > 1:
        names = ", ".join(sorted(cues_by_recording)[:5])
        raise TranscriptError(label, None, f"holds {len(cues_by_recording)} recordings ({names}, ...); "
                                           "pass recording_id")
    return [c for cues in cues_by_recording.values() for c in cues]


def _supervision_items(items: list[Any], label: str, lines: list[int] | None) -> list[tuple[int | str, Mapping[str, Any]]]:
    """(where, supervision) of a supervision list, or of a cut set's cuts (`CutSet.to_file`): a cut's
    supervisions, timed from the cut's start, moved to recording time (lhotse keeps word alignments
    in recording time), each once (trimmed cuts repeat the neighbours they overlap)."""
    out: list[tuple[int | str, Mapping[str, Any]]] = []
    seen: set[tuple[Any, ...]] = set()
    for index, item in enumerate(items):
        where: int | str = lines[index] if lines else f"item {index}"
        if not isinstance(item, Mapping) or "tracks" in item:
            raise TranscriptError(label, where, "not a supervision object or a MonoCut (a MixedCut: give its "
                                                f"supervisions instead), found {type(item).__name__}")
        if "supervisions" not in item:
            out.append((where, item))
            continue
        offset, sups = _number(item, "start", label, where), item["supervisions"]
        for sup in sups if isinstance(sups, list) else [sups]:
            if not isinstance(sup, Mapping):
                raise TranscriptError(label, where, f"a supervision is an object, found {type(sup).__name__}")
            moved = {**sup, "start": round(offset + _number(sup, "start", label, where), 6)}
            key = (moved.get("recording_id"), moved.get("id") or (moved["start"], moved.get("text")))
            if key not in seen:
                seen.add(key)
                out.append((where, moved))
    return out


def _alignment(alignment: Any, label: str, where: int | str) -> tuple[Word, ...]:
    """lhotse `alignment["word"]`: items [symbol, start, duration, score?] or {symbol, start, duration}."""
    if alignment is None:
        return ()
    items = alignment.get("word") if isinstance(alignment, Mapping) else None
    if not items:
        return ()
    words = []
    for item in items:
        if isinstance(item, Mapping):
            symbol, start, duration = item.get("symbol"), item.get("start"), item.get("duration")
        elif isinstance(item, (list, tuple)) and len(item) >= 3:
            symbol, start, duration = item[0], item[1], item[2]
        else:
            raise TranscriptError(label, where, f"word alignment item {item!r} is not [symbol, start, duration]")
        timing = {"start": start, "duration": duration}
        start_s = _number(timing, "start", label, where)
        start_s, end_s = checked_span(label, where, start_s, start_s + _number(timing, "duration", label, where))
        if (word := sanitize_transcript(symbol)) and word.lower() not in PAUSE_MARKS:
            words.append(Word(start_s, end_s, word))
    return tuple(sorted(words, key=lambda w: (w.start_s, w.end_s)))


def _whisper(text: str, label: str) -> list[Cue]:
    """`{"segments": [{"start", "end", "text", "speaker"?, "words": [{"word", "start", "end"}]?}]}`
    (or the bare segments list). A segment with a word lacking times (WhisperX leaves numbers
    unaligned) keeps no word timings: its text is then placed as a whole cue."""
    doc = _json(text, label)
    segments = doc.get("segments") if isinstance(doc, Mapping) else doc
    if not isinstance(segments, list):
        raise TranscriptError(label, None, 'a Whisper-style transcript is an object with a "segments" list')
    cues = []
    for index, seg in enumerate(segments):
        where = f"segments[{index}]"
        if not isinstance(seg, Mapping):
            raise TranscriptError(label, where, f"a segment is an object, found {type(seg).__name__}")
        start, end = checked_span(label, where, _number(seg, "start", label, where), _number(seg, "end", label, where))
        words: list[Word] = []
        raw_words = seg.get("words") or []
        for w_index, w in enumerate(raw_words if isinstance(raw_words, list) else []):
            if not isinstance(w, Mapping) or not all(isinstance(w.get(k), (int, float)) for k in ("start", "end")):
                words = []
                break
            w_where = f"{where}.words[{w_index}]"
            ws, we = checked_span(label, w_where, _number(w, "start", label, w_where), _number(w, "end", label, w_where))
            if word := sanitize_transcript(w.get("word", w.get("text"))):
                words.append(Word(ws, we, word))
        body = sanitize_transcript(seg.get("text")) or " ".join(w.text for w in words)
        if body:
            cues.append(Cue(start, end, body, speaker_name(seg.get("speaker")), tuple(words)))
    return cues

