"""A lhotse record (a cut, or a recording with one supervision) → a Clip, without lhotse installed.

Kept apart from tasks/ingest/lhotse.py, which finds the rows (manifest layouts, ids, offsets): this
module holds what lhotse's data model means for a clip, and changes when that reading does.

Which supervisions speak for a cut: only those lying inside it (within SUPERVISION_TOLERANCE_S, on
one of its channels). lhotse's `trim_to_supervisions()` keeps overlapping neighbours by default
(`keep_overlapping=True`), and a `truncate`/`split` slice keeps the supervisions it cuts through;
such partial ones never add text, speakers or labels. One supervision inside: its text and labels
are the clip's. Several: the clip gets one span per supervision (`Clip.spans`, time order, each
with its text, speaker and labels), the transcript is their texts joined, and a label is the
clip's only when every span agrees on it (`sources[].multi_speaker: quarantine` drops clips with
several speakers instead). Labels, verbatim: recording_id, the supervision's speaker, gender and
every scalar in its `custom`, then every scalar in the cut's `custom`; `language` as written.
Seed labels by default: every scalar supervision `custom` key that is not a canonical attribute
(gender, emotion, age, accent), under its own name (`dialog_act` → `Dialog act`); cut-level
`custom` is bookkeeping (splits, origins) and stays out of the seed unless `seed_labels` names it.

Audio is read only below the manifest's folder and `sources[N].allowed_roots`: recordings often hold
absolute paths from wherever lhotse ran, and such a clip is `path_outside_root` (its message names
the folder to add to allowed_roots). A relative path is tried against the manifest folder, its
parents and the cwd, but only where that lands inside the roots.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from schemas.attributes import SeedLabel, display_name
from schemas.records import Clip, QuarantineError, ReasonCode, Segment
from storage.sources import join
from tasks.audio import open_regular
from tasks.features.labels import is_attribute_label
from tasks.ingest.common import CorpusPath, SourceError, clean_label_value, one_line, path_of
from tasks.ingest.files import open_source
from tasks.ingest.paths import Rejected, Roots
from tasks.llm.messages import sanitize_prompt_text

WHOLE_FILE_TOLERANCE_S = 0.025  # lhotse's own duration-mismatch tolerance
SUPERVISION_TOLERANCE_S = 0.025  # how far a supervision may stick out of a cut and still be inside it
LHOTSE_HINT = "lhotse manifests keep the audio paths of the machine that prepared them"


def as_float(value: Any) -> float | None:
    """A manifest number as a float; None when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def cut_clip(cut: dict[str, Any], base: CorpusPath, where: str, clip_id: str, dataset: str, language: str | None,
             extra_labels: dict[str, str], bad: Callable[[str], Clip], roots: Roots) -> Clip:
    """The clip of one cut (MonoCut / MultiCut with its recording inline), or `bad` for any other."""
    cut_type = cut.get("type") or ("MixedCut" if "tracks" in cut else "MonoCut")
    recording = cut.get("recording")
    if cut_type not in ("MonoCut", "MultiCut") or not isinstance(recording, dict):
        return bad(f"{where}: {cut_type} {cut.get('id')!r} has no single recording (mixed or padding cuts are not "
                   "read); export the cuts before mixing/padding, or use a recordings+supervisions manifest")
    sups = [s for s in cut.get("supervisions") or [] if isinstance(s, dict)]
    custom = cut.get("custom") if isinstance(cut.get("custom"), dict) else {}
    return make_clip(recording, sups, float(cut.get("start") or 0.0), as_float(cut.get("duration")),
                     cut.get("channel"), custom or {}, base, where, clip_id, dataset, language, extra_labels, bad,
                     roots)


def _scalars(custom: Any) -> dict[str, str]:
    """The scalar entries of a lhotse `custom` dict as label text (lists and dicts are not labels)."""
    out: dict[str, str] = {}
    if isinstance(custom, dict):
        for key, value in custom.items():
            if isinstance(value, (str, int, float, bool)) and clean_label_value(value):
                out[str(key)] = clean_label_value(value)
    return out


def _sup_labels(sup: dict[str, Any]) -> dict[str, str]:
    labels = {key: clean_label_value(sup[key]) for key in ("speaker", "gender")
              if sup.get(key) is not None and clean_label_value(sup[key])}
    return labels | _scalars(sup.get("custom"))


def _channels(value: Any) -> set[int] | None:
    if value is None:
        return None
    try:
        return {int(c) for c in (value if isinstance(value, list) else [value])}
    except (TypeError, ValueError):
        return None


def inside(sups: list[dict[str, Any]], duration: float | None, channel: Any,
           tolerance: float = SUPERVISION_TOLERANCE_S) -> list[dict[str, Any]]:
    """The supervisions lying inside a clip of `duration` (starts relative to the clip) on one of its
    channels, in time order; a partially overlapping neighbour is not inside."""
    wanted = _channels(channel)
    out = []
    for sup in sups:
        start, length = as_float(sup.get("start")) or 0.0, as_float(sup.get("duration"))
        if start < -tolerance or (duration is not None and length is not None
                                  and start + length > duration + tolerance):
            continue
        theirs = _channels(sup.get("channel"))
        if wanted is not None and theirs is not None and not wanted & theirs:
            continue
        out.append(sup)
    return sorted(out, key=lambda s: (as_float(s.get("start")) or 0.0, str(s.get("id", ""))))


def _span(sup: dict[str, Any], duration: float | None) -> Segment:
    start = max(0.0, as_float(sup.get("start")) or 0.0)
    end = start + (as_float(sup.get("duration")) or 0.0)
    if duration is not None:
        end = min(end, duration)
    return Segment(start_s=start, end_s=end, text=one_line(str(sup.get("text") or "")) or "",
                   speaker=clean_label_value(sup["speaker"]) if sup.get("speaker") is not None else None,
                   labels=_sup_labels(sup))


def _agreed(dicts: list[dict[str, str]]) -> dict[str, str]:
    """The entries every dict has with the same value."""
    if not dicts:
        return {}
    return {k: v for k, v in dicts[0].items() if all(d.get(k) == v for d in dicts[1:])}


def default_seed_labels(sups: list[dict[str, Any]]) -> list[SeedLabel]:
    """Every scalar supervision `custom` key that is no canonical attribute, under its own name."""
    out: list[SeedLabel] = []
    seen: set[str] = set()
    for sup in sups:
        for key in _scalars(sup.get("custom")):
            if is_attribute_label(key) or key.lower() in seen:
                continue
            seen.add(key.lower())
            try:
                entry = SeedLabel(label=key, display=sanitize_prompt_text(display_name(key), "name"))
            except ValueError:  # a key with no usable name (only punctuation): it stays a plain label
                continue
            if entry.display.lower() not in {e.display.lower() for e in out}:
                out.append(entry)
    return out


def make_clip(recording: dict[str, Any], sups: list[dict[str, Any]], start: float, duration: float | None,
              channel: Any, custom: dict[str, Any], base: CorpusPath, where: str, clip_id: str, dataset: str,
              language: str | None, extra_labels: dict[str, str], bad: Callable[[str], Clip], roots: Roots) -> Clip:
    """The clip of [start, start+duration) of `recording` on `channel`, with the supervisions inside it."""
    length = duration if duration is not None else as_float(recording.get("duration"))
    own = inside(sups, length, channel)
    spans = [_span(s, length) for s in own]
    labels = dict(extra_labels)
    if recording.get("id"):
        labels["recording_id"] = str(recording["id"])
    labels |= _agreed([s.labels for s in spans]) | _scalars(custom)
    languages = {clean_label_value(s["language"]) for s in own if s.get("language") is not None}
    lang = languages.pop() if len(languages) == 1 else language
    texts = [s.text for s in spans if s.text]
    audio = _audio(recording, start, duration, channel, base, where, roots)
    if isinstance(audio, str):
        return bad(audio)
    if isinstance(audio, Rejected):
        return audio.clip(clip_id, dataset, where)
    uri, data = audio
    return Clip(id=clip_id, dataset=dataset, audio_uri=uri, audio_bytes=data,
                transcript=" ".join(texts) or None, language=lang, labels=labels,
                seed_labels=default_seed_labels(own), spans=spans if len(spans) > 1 else [])


def _resolve(source: str, base: CorpusPath, roots: Roots, where: str) -> str | Rejected:
    """The real path of a recording's audio, or why it is not read. Relative paths are relative to
    where lhotse ran: the manifest folder, its parents and the cwd are tried, but only candidates
    inside `roots` count; one found only outside them is `path_outside_root`, naming the folder.
    In an s3:// manifest a relative path is relative to the manifest's own folder (one URI)."""
    if "\0" in source or "://" in source or Path(source).expanduser().is_absolute():
        return _hinted(roots.check(source, where))
    if not isinstance(base, Path):
        return _hinted(roots.check(join(str(base), source), where))
    p = Path(source).expanduser()
    found_outside: Rejected | None = None
    for folder in (base, *list(base.parents)[:3], Path.cwd()):
        checked = roots.check(str(folder / p), where)
        if isinstance(checked, str):
            if os.path.exists(checked):
                return checked
        elif (found_outside is None and checked.reason is ReasonCode.path_outside_root
              and os.path.lexists(folder / p)):
            found_outside = checked
    if found_outside is not None:
        return _hinted(found_outside)
    return _hinted(roots.check(str(base / p), where))  # missing: the audio stage says missing_file


def _hinted(checked: str | Rejected) -> str | Rejected:
    if isinstance(checked, Rejected) and checked.reason is ReasonCode.path_outside_root:
        return Rejected(checked.reason, f"{checked.message} ({LHOTSE_HINT})")
    return checked


def _audio(recording: dict[str, Any], start: float, duration: float | None, channel: Any, base: CorpusPath,
           where: str, roots: Roots) -> tuple[str, bytes | None] | str | Rejected:
    """(audio uri, embedded bytes or None for the whole file), an error message (bad_row), or a
    rejection with its own reason (a path outside the roots, a FIFO...)."""
    rec_id = recording.get("id")
    transforms = [t for t in recording.get("transforms") or []
                  if not (isinstance(t, dict) and t.get("name") == "Resample")]
    if transforms:
        names = [t.get("name") if isinstance(t, dict) else str(t) for t in transforms]
        return (f"{where}: recording {rec_id!r} has audio transforms {names} (e.g. speed perturbation) that are "
                "not applied here; use the manifest without perturbation")
    sources = [s for s in recording.get("sources") or [] if isinstance(s, dict)]
    wanted = _wanted_channels(recording, channel)[1]
    picked = [s for s in sources if set(wanted) & {int(c) for c in s.get("channels") or [0]}]
    if len(picked) != 1:
        return f"{where}: recording {rec_id!r} has no single audio source for channel(s) {wanted}"
    src = picked[0]
    src_type, value = src.get("type"), src.get("source")
    if src_type not in ("file", "url") or not isinstance(value, str):
        return (f"{where}: recording {rec_id!r} has a {src_type!r} audio source, which is not read here; "
                "only 'file' (and whole-recording 'url') sources are supported")
    whole = whole_recording(recording, start, duration, channel)
    if src_type == "url":
        checked = _hinted(roots.check(value, where))
        if isinstance(checked, Rejected):
            return checked
        if whole:
            return value, None
        return f"{where}: recording {rec_id!r}: segments of 'url' sources are not supported; copy the audio locally"
    resolved = _resolve(value, base, roots, where)
    if isinstance(resolved, Rejected):
        return resolved
    if whole or (isinstance(base, Path) and not os.path.lexists(resolved)):  # the audio stage reads it
        return resolved, None
    path = path_of(resolved)
    src_channels = [int(c) for c in src.get("channels") or [0]]
    return _segment(path, start, duration, [src_channels.index(c) for c in wanted if c in src_channels], where)


def _wanted_channels(recording: dict[str, Any], channel: Any) -> tuple[list[int], list[int]]:
    """(every channel of the recording's sources, the channels the clip asks for)."""
    sources = [s for s in recording.get("sources") or [] if isinstance(s, dict)]
    all_channels = sorted({int(c) for s in sources for c in s.get("channels") or [0]})
    wanted = sorted({int(c) for c in (channel if isinstance(channel, list) else [channel])}) \
        if channel is not None else all_channels
    return all_channels, wanted


def whole_recording(recording: dict[str, Any], start: float, duration: float | None, channel: Any) -> bool:
    """Whether a clip of [start, start+duration) on `channel` is its whole recording: then it points at
    the file (which the shard may cut into segments); otherwise its part is embedded (never cut)."""
    all_channels, wanted = _wanted_channels(recording, channel)
    rec_duration = as_float(recording.get("duration"))
    end = start + duration if duration is not None else None
    return (start <= WHOLE_FILE_TOLERANCE_S and set(wanted) >= set(all_channels)
            and (end is None or rec_duration is None or end >= rec_duration - WHOLE_FILE_TOLERANCE_S))


def _segment(path: CorpusPath, start: float, duration: float | None, channels: list[int],
             where: str) -> tuple[str, bytes] | str | Rejected:
    """Cut [start, start+duration) (and the wanted channels) out of a file as FLAC bytes; only a
    regular file is opened (a FIFO or device is `not_a_file`, see `tasks.audio.open_regular`); an
    s3:// recording is read by range requests."""
    try:
        handle = open_source(path) if not isinstance(path, Path) else open_regular(path, f"{where}: {path}", None)[0]
    except QuarantineError as exc:
        return Rejected(exc.reason, exc.message)
    except SourceError as exc:
        missing = "no such object" in str(exc)
        return Rejected(ReasonCode.missing_file if missing else ReasonCode.storage_error, f"{where}: {exc}")
    try:
        with handle, sf.SoundFile(handle) as f:
            sr = f.samplerate
            first = max(0, round(start * sr))
            total = f.frames if 0 < f.frames < 2**62 else None  # a piped FLAC states no length
            if duration is not None:
                frames = round(duration * sr)
            elif total is not None:
                frames = total - first
            else:
                return f"{where}: {path} states no length in its header; re-encode it (e.g. `sox in.flac out.flac`)"
            if first > 0:
                f.seek(first)
            samples = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
        return f"{where}: cannot read the segment from {path} ({exc})"
    if channels and samples.shape[1] > 1:
        samples = samples[:, [c for c in channels if c < samples.shape[1]] or [0]]
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sr, format="FLAC", subtype="PCM_24")
    end = start + samples.shape[0] / sr
    return f"{path}#t={start:.3f},{end:.3f}", buf.getvalue()
