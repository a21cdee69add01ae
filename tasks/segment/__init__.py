"""Long recordings become clips: stream blocks → speech regions (Silero VAD) → segments.

`segment_recording` is what a shard task calls per recording: it decodes the file in
`segment.block_s` blocks (tasks/segment/blocks.py: never the whole file), feeds them to one VAD
detector (tasks/segment/vad.py), and cuts the speech regions into segments (tasks/segment/cut.py).
The shard task then reads each segment's samples with `read_segment`. Nothing here imports torch
at module import time; transcripts.py (timestamped sidecars) lives next to these modules.
"""

from __future__ import annotations

from collections.abc import Sequence

from schemas.config import SegmentConfig
from tasks.audio import DEFAULT_MAX_FILE_BYTES
from tasks.segment.blocks import RecordingInfo, iter_blocks, read_segment, recording_info
from tasks.segment.cut import SpeechSegment, cut_segments, segment_id
from tasks.segment.vad import VADParams, detector, mask_regions, resolve_engine

__all__ = ["RecordingInfo", "SpeechSegment", "read_segment", "recording_info", "segment_id",
           "segment_recording", "should_segment", "vad_params"]


def vad_params(config: SegmentConfig) -> VADParams:
    return VADParams(threshold=config.threshold, min_silence_s=config.min_silence_s,
                     min_speech_s=config.min_speech_s)


def should_segment(duration_s: float, max_duration_s: float, config: SegmentConfig) -> bool:
    """Whether a recording of `duration_s` is cut into segments under `config.mode`."""
    if config.mode == "never":
        return False
    return config.mode == "always" or duration_s > max_duration_s


def segment_recording(uri: str, recording_id: str, config: SegmentConfig = SegmentConfig(),  # noqa: B008
                      preferred_cuts: Sequence[float] = (),
                      max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> list[SpeechSegment]:
    """Segments of one recording, in order; memory stays bounded by one block plus the per-frame VAD
    decisions (~1.4 MB an hour). Raises QuarantineError for a file that cannot be read."""
    frames = detector(config.vad)
    samples = 0
    for block in iter_blocks(uri, config.block_s, max_bytes):
        frames.feed(block)
        samples += len(block)
    mask, frame_s = frames.finish(vad_params(config))
    duration = samples / 16_000
    return cut_segments(mask_regions(mask, frame_s), duration, recording_id, min_s=config.min_s,
                        max_s=config.max_s, pad_s=config.pad_s, preferred_cuts=preferred_cuts)


def vad_engine(config: SegmentConfig) -> str:
    """The engine `config.vad` resolves to here (for provenance: silero or energy)."""
    return resolve_engine(config.vad)
