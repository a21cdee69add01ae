"""Recordings → clips inside the shard task: the glue between ingest's clips and the segmenter.

A planned clip whose header says it is longer than `audio.max_duration_s` (segment mode `auto`),
or any clip of a source with mode `always`, is not decoded whole: it is cut into speech segments
(`segment_recording`, bounded memory) and each segment becomes a `Clip` of its own, id
`<recording id>@<start ms>-<end ms>`, with the recording's labels, dataset, language and URI, its
offset, and its samples read by seeking (`read_segment`). From there a segment is a clip like any
other (measure → describe → LLM → QC → row; the request cache keys on its id).

Transcripts: a timestamped sidecar next to local audio (`find_sidecar`), a clip-list row's
`timestamps` file, or a lhotse clip's supervisions give each segment the words inside its span,
and the cutter prefers their boundaries. A recording's whole-file text cannot be cut, so without
timestamps a segment has none: Whisper transcribes it (`features.asr.enabled`), else its seed is
labels-only (counted in `rows_without_transcript`).

Every planned clip still ends as rows or quarantine rows: a recording without speech is one
`no_speech` row under the recording's id, an unreadable one its usual reason, a bad sidecar one
`bad_row` naming the file and line. The shard's check (rows + quarantined = clips) counts the extra
segments through `ShardTally.recordings_cut` and `.segments`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from schemas.config import RunConfig, SegmentConfig
from schemas.records import Clip, QuarantineError, ReasonCode, Stage
from storage import sources as stores
from tasks.audio import read_source_bytes
from tasks.ingest import ClipRef, load_clip
from tasks.segment import read_segment, recording_info, segment_recording, should_segment
from tasks.segment.cues import Cue, TranscriptError, cue_boundaries, text_in_span
from tasks.segment.transcripts import MAX_SIDECAR_BYTES, find_sidecar, load_transcript
from tasks.tally import ShardTally, quarantine

SR = 16_000


def shard_clips(refs: Iterable[ClipRef], config: RunConfig, acc: ShardTally) -> Iterator[Clip]:
    """The clips a shard processes, lazily: each planned clip, or the segments of a recording.

    `acc.refs_done` counts a planned clip as handed on when its last clip is yielded (progress
    counts planned clips, rows count segments)."""
    for ref in refs:
        clip = load_clip(ref, config.sources)
        segment = config.segment_for(config.sources[ref.source])
        yield from _expand(clip, segment, config, acc)


def _expand(clip: Clip, segment: SegmentConfig, config: RunConfig, acc: ShardTally) -> Iterator[Clip]:
    if not _is_recording(clip, segment, config):
        acc.refs_done += 1
        yield clip
        return
    try:
        cues = timed_transcript(clip)
        segments = segment_recording(clip.audio_uri, clip.id, segment, cue_boundaries(cues) if cues else (),
                                     config.audio.max_file_bytes)
    except QuarantineError as exc:
        _drop(acc, clip, exc.stage, exc.reason, exc.message)
        return
    except TranscriptError as exc:
        _drop(acc, clip, Stage.ingest, ReasonCode.bad_row,
              f"{clip.audio_uri}: its timestamped transcript cannot be read ({exc}); fix or remove that file")
        return
    except Exception as exc:  # noqa: BLE001 - one recording's bug must not take the shard down
        _drop(acc, clip, Stage.audio, ReasonCode.unreadable, f"{clip.audio_uri}: {exc.__class__.__name__}: {exc}")
        return
    if not segments:
        _drop(acc, clip, Stage.audio, ReasonCode.no_speech,
              f"{clip.audio_uri}: the VAD found no speech segment of at least segment.min_s={segment.min_s} s in "
              "this recording; if this source is not speech, set sources[].speech: false and segment: never")
        return
    acc.recordings_cut += 1
    acc.segments += len(segments)
    for i, seg in enumerate(segments):
        part = Clip(id=seg.id, dataset=clip.dataset, audio_uri=clip.audio_uri, language=clip.language,
                    labels=clip.labels, seed_labels=clip.seed_labels, speech=clip.speech, offset_s=seg.start_s,
                    transcript=text_in_span(cues, seg.start_s, seg.end_s) if cues else None)
        try:
            samples = read_segment(clip.audio_uri, seg.start_s, seg.end_s, config.audio.max_file_bytes)
            part = part.model_copy(update={"audio_bytes": wav_bytes(samples)})
        except QuarantineError as exc:  # measure quarantines it under the segment's id
            part = part.model_copy(update={"ingest_error": (exc.reason, exc.message)})
        if i == len(segments) - 1:
            acc.refs_done += 1
        yield part


def _drop(acc: ShardTally, clip: Clip, stage: Stage, reason: ReasonCode, message: str) -> None:
    quarantine(acc, clip, stage, reason, message)
    acc.refs_done += 1


def _is_recording(clip: Clip, segment: SegmentConfig, config: RunConfig) -> bool:
    """Whether `clip` is cut into segments: never for a clip ingest already refused, embedded audio
    (no file to seek in), or mode `never`; always with mode `always`; with `auto` when the header
    (read without decoding: for s3:// and http(s):// one stat and a range read or two of the header)
    says it is longer than audio.max_duration_s. A header that cannot be read (or an object above
    audio.max_file_bytes) takes the whole-clip path, whose checks name the problem."""
    if clip.ingest_error is not None or clip.audio_bytes is not None or segment.mode == "never":
        return False
    if segment.mode == "always":
        return True
    try:
        info = recording_info(clip.audio_uri, config.audio.max_file_bytes)
    except QuarantineError:
        return False
    return should_segment(info.duration_s, config.audio.max_duration_s, segment)


def timed_transcript(clip: Clip) -> list[Cue]:
    """The recording's timed text: a clip-list row's `timestamps` file, else a sidecar next to local
    audio, else the clip's supervisions (lhotse); [] when there is none."""
    if clip.timestamps_uri is not None:
        return _read_cues(clip.timestamps_uri, clip.audio_uri)
    sidecar = find_sidecar(clip.audio_uri.removeprefix("file://"))
    if sidecar is not None:
        return _load(sidecar, sidecar.name, clip.audio_uri)
    return [Cue(s.start_s, s.end_s, s.text, s.speaker) for s in clip.spans if s.text]


def _read_cues(uri: str, audio_uri: str) -> list[Cue]:
    name = uri.rsplit("/", 1)[-1]
    if stores.is_remote(uri):
        return _load(read_source_bytes(uri, MAX_SIDECAR_BYTES), name, audio_uri)
    return _load(Path(uri.removeprefix("file://")), name, audio_uri)


def _load(source: Path | bytes, name: str, audio_uri: str) -> list[Cue]:
    """Cues of a transcript file; one holding several recordings (CTM, supervisions) gives those of
    the recording named like the audio file's stem."""
    try:
        return load_transcript(source, name=name)
    except TranscriptError as exc:
        if "recording_id" not in exc.problem:
            raise
        return load_transcript(source, name=name, recording_id=Path(audio_uri.rsplit("/", 1)[-1]).stem)


def wav_bytes(samples: np.ndarray) -> bytes:
    """A segment's samples as the clip's embedded audio: 16-bit WAV at 16 kHz (what rows store: lossless
    for 16-bit sources read at 16 kHz), decoded and checked like any embedded clip."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()
