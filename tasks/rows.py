"""Building rows: a measured clip's attribute words, seed and instruction (the LLM request), then the
dataset row around the model's answer.

Describing quarantines a clip whose Whisper transcript is too long or whose description fails; the
row carries the audio's name (its bytes are in the shard's audio file, tasks/clip_cache.py), features, seed, messages, the prompt as rendered (where we render it), the
response and the run's provenance.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from schemas.config import RunConfig
from schemas.records import AudioRef, Features, Provenance, QuarantineError, ReasonCode, Row, Segment, Stage
from tasks.audio import audio_name
from tasks.describe import (
    Bins,
    describe_attributes,
    describe_multi_span,
    prompt_transcript,
    seed_description,
    stable_int,
    without_voice,
)
from tasks.features.labels import resolve_attributes
from tasks.instructions import Instruction, instruction_pool, parse_instruction, pick_instruction
from tasks.llm import LLMBackend, LLMRequest, LLMResult, build_messages
from tasks.llm.messages import DEFAULT_SYSTEM_PROMPT, transcript_too_long
from tasks.measure import Measured
from tasks.run import RunContext
from tasks.tally import ShardTally, quarantine


@dataclass
class Prepared:
    """A described clip: its words, seed, instruction and the request the LLM gets."""

    measured: Measured
    features: Features
    attributes: dict[str, str]
    attribute_sources: dict[str, str]
    seed: str
    instruction: Instruction
    request: LLMRequest


def describe_clip(m: Measured, config: RunConfig, bins: Bins, acc: ShardTally) -> Prepared | None:
    """Attribute words, seed description, instruction and LLM request of one measured clip."""
    t0 = time.perf_counter()
    clip = m.clip
    cap = config.describe.max_transcript_chars
    if transcript_too_long(m.transcript, cap):  # a Whisper transcript (corpus ones were checked on entry)
        quarantine(acc, clip, Stage.describe, ReasonCode.transcript_too_long,
                   f"{clip.audio_uri}: {m.transcript_source} transcript of {len(m.transcript or '')} characters > "
                   f"describe.max_transcript_chars={cap}")
        return None
    # A non-speech source: a labels-only seed (no transcript, no voice attributes), as DeSTA2.5 for sound.
    transcript = m.transcript if m.speech else None
    try:
        min_scores = {c.attribute: c.min_score for c in config.features.classifiers}
        features = resolve_attributes(m.features, clip.labels, m.predictions, min_scores)
        if not m.speech:
            features = without_voice(features)
        segments: list[Segment] | None = m.segments if config.describe.segment_timestamps and m.speech else None
        if len(clip.spans) > 1 and m.speech:  # several supervisions (lhotse): one span each, with its own attributes
            multi = describe_multi_span(features, clip.labels, clip.spans, m.audio.samples, m.audio.sampling_rate,
                                        bins, config.describe.attributes, clip.seed_labels, config.features)
            described, shown, segments = multi.merged, multi.clip.words, multi.spans
            m.segments = multi.spans
        else:
            described = describe_attributes(features, clip.labels, bins, config.describe.attributes,
                                            clip.seed_labels)
            shown = described.words
        attributes = described.words
        # Transcript, names and values are data: seed_description sanitises every one of them.
        seed = seed_description(transcript, m.audio.duration_s, shown, config.describe.format, segments)
        shown_transcript = prompt_transcript(transcript, shown, segments)
        instruction = parse_instruction(
            pick_instruction(instruction_pool(config.describe), config.describe.seed, clip.id))
        system = config.llm.system_prompt or (DEFAULT_SYSTEM_PROMPT if config.llm.default_system_prompt else None)
        messages = build_messages(seed, instruction.text, system)
    except Exception as exc:  # noqa: BLE001 - one clip's bug must not take the shard down
        quarantine(acc, clip, Stage.describe, ReasonCode.describe_error,
                   f"{clip.audio_uri}: {exc.__class__.__name__}: {exc}")
        return None
    acc.stage_seconds["describe"] += time.perf_counter() - t0
    request = LLMRequest(id=clip.id, messages=messages, seed=stable_int(config.llm.seed, clip.id) % (2**31),
                         attributes=attributes, transcript=shown_transcript, duration_s=m.audio.duration_s)
    return Prepared(measured=m, features=features, attributes=attributes, attribute_sources=described.sources,
                    seed=seed, instruction=instruction, request=request)


def rendered_prompt(backend: LLMBackend, config: RunConfig, request: LLMRequest) -> str | None:
    """The prompt text exactly as the model got it, where we render the chat template ourselves."""
    rendered = backend.render(request)  # in-process backends render it (also through the request cache)
    if rendered is not None:
        return rendered
    if config.llm.prompt_format == "completion" and config.llm.tokenizer:
        from tasks.llm.chat_template import render_prompt

        return render_prompt(request.messages, config.llm.tokenizer)
    return None


def build_row(p: Prepared, result: LLMResult | QuarantineError, config: RunConfig, ctx: RunContext,
              acc: ShardTally, backend: LLMBackend) -> Row | None:
    """The dataset row of a clip and its answer; None (and a quarantine row) for a failed answer."""
    if isinstance(result, QuarantineError):
        quarantine(acc, p.measured.clip, result.stage, result.reason, result.message)
        return None
    t0 = time.perf_counter()
    m = p.measured
    row = Row(
        id=m.clip.id,
        dataset=m.clip.dataset,
        # The bytes live in the shard's audio file (tasks/clip_cache.py), under the same name.
        audio=AudioRef(bytes=None, path=audio_name(m.clip.id, config.output.audio_format)),
        audio_uri=m.clip.audio_uri,
        audio_sha256=m.audio.sha256,
        sampling_rate=m.audio.sampling_rate,
        duration_s=m.audio.duration_s,
        audio_offset_s=m.clip.offset_s,
        transcript=m.transcript,
        transcript_source=m.transcript_source,
        language=m.language,
        segments=m.segments,
        labels=m.clip.labels,
        features=p.features,
        attributes=p.attributes,
        attribute_sources=p.attribute_sources,
        seed_description=p.seed,
        prompt=p.instruction.text,
        messages=p.request.messages,
        rendered_prompt=rendered_prompt(backend, config, p.request),
        response=result.text,
        generation=result.generation,
        provenance=Provenance(pipeline_version=ctx.pipeline_version, config_hash=ctx.config_hash,
                              bins_version=ctx.bins_version, extractor_versions=ctx.extractor_versions,
                              run_id=ctx.run_id, created_at=acc.created_at),
    )
    acc.audio_seconds += m.audio.duration_s
    acc.rows_without_transcript += not m.transcript
    acc.tokens_prompt += result.generation.prompt_tokens or 0
    acc.tokens_completion += result.generation.completion_tokens or 0
    for key, word in p.attributes.items():
        acc.attribute_counts.setdefault(key, Counter())[word] += 1
    acc.stage_seconds["row"] += time.perf_counter() - t0
    return row
