"""Measuring clips: decode and DSP per clip, then Whisper, speaking rates and classifiers per batch.

A clip that cannot be measured (unreadable, silent, too long, a model stage that fails on it) is
quarantined with its stage and reason; the others go on to be described (tasks/rows.py). Model
stages run per batch, under the shard's GPU gate and each model's lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from schemas.config import RunConfig
from schemas.records import Clip, Features, QuarantineError, ReasonCode, Segment, Stage
from tasks.audio import DecodedAudio, load_audio, require_speech
from tasks.features import extract_features
from tasks.features.models import LoadedModels
from tasks.features.phonemes import phoneme_counts, phoneme_rate
from tasks.features.rate import speaking_rates
from tasks.llm.messages import transcript_too_long
from tasks.stopping import check_stop
from tasks.tally import ShardTally, quarantine


@dataclass
class Measured:
    """A clip after decode + DSP, on its way through the batched model stages."""

    clip: Clip
    audio: DecodedAudio
    features: Features
    transcript: str | None
    transcript_source: str | None
    language: str | None
    segments: list[Segment] = field(default_factory=list)
    predictions: dict[str, tuple[str, float]] = field(default_factory=dict)
    speech: bool = True  # False: a clip of a `sources[].speech: false` source (sound, music)


def measure_clip(clip: Clip, config: RunConfig, acc: ShardTally) -> Measured | None:
    """Decode and DSP one clip; None (and a quarantine row) for a clip that cannot be used."""
    check_stop(f"shard {acc.shard:05d}")  # outside the per-clip `except`: a stop is not a bad clip
    if clip.ingest_error is not None:
        reason, message = clip.ingest_error
        quarantine(acc, clip, Stage.ingest, reason, message)
        return None
    cap = config.describe.max_transcript_chars
    if transcript_too_long(clip.transcript, cap):  # its raw length, before any work is spent on it
        quarantine(acc, clip, Stage.ingest, ReasonCode.transcript_too_long,
                   f"{clip.audio_uri}: transcript of {len(clip.transcript or '')} characters > "
                   f"describe.max_transcript_chars={cap}; fix the corpus row (a whole text pasted into one "
                   "transcript?) or raise the limit")
        return None
    speech = clip.speech
    stage = Stage.audio
    try:
        t0 = time.perf_counter()
        audio = load_audio(clip, config.audio)
        t1 = time.perf_counter()
        stage = Stage.features
        features = extract_features(audio.samples, audio.sampling_rate, clip.transcript, clip.labels, config.features)
        features = features.model_copy(update={"clipping_ratio": audio.clipping_ratio})
        if speech:  # a sound or music source keeps its clips whatever the VAD says
            require_speech(features.speech_duration_s, clip.audio_uri, config.audio)
    except QuarantineError as exc:
        quarantine(acc, clip, exc.stage, exc.reason, exc.message)
        return None
    except Exception as exc:  # noqa: BLE001 - one clip's bug must not take the shard down
        reason = ReasonCode.feature_error if stage is Stage.features else ReasonCode.unreadable
        quarantine(acc, clip, stage, reason, f"{clip.audio_uri}: {exc.__class__.__name__}: {exc}")
        return None
    acc.stage_seconds["audio"] += t1 - t0
    acc.stage_seconds["features"] += time.perf_counter() - t1
    return Measured(clip=clip, audio=audio, features=features, transcript=clip.transcript,
                    transcript_source="corpus" if clip.transcript else None, language=clip.language, speech=speech)


def measure_batch(batch: list[Clip], config: RunConfig, acc: ShardTally, models: LoadedModels) -> list[Measured]:
    """Decode + DSP per clip, then Whisper, rates and classifiers over the batch's measured clips."""
    measured = [m for m in (measure_clip(clip, config, acc) for clip in batch) if m is not None]
    measured = _transcribe(measured, models, config, acc)
    _add_rates(measured, config, acc)
    return _classify(measured, models, acc)


def _transcribe(measured: list[Measured], models: LoadedModels, config: RunConfig, acc: ShardTally) -> list[Measured]:
    """Whisper for the clips without a corpus transcript; a failed or hallucinated one is quarantined."""
    todo = [m for m in measured if not m.transcript and m.speech]  # Whisper on sound only hallucinates
    if models.transcriber is None or not todo:
        return measured
    t0 = time.perf_counter()
    with acc.gate("asr"), models.lock("asr"):
        results = models.transcriber.transcribe([m.audio.samples for m in todo])
    acc.stage_seconds["asr"] += time.perf_counter() - t0
    dropped: set[int] = set()
    for m, result in zip(todo, results, strict=True):
        if isinstance(result, QuarantineError):
            quarantine(acc, m.clip, result.stage, result.reason, f"{m.clip.audio_uri}: {result.message}")
            dropped.add(id(m))
            continue
        m.features = m.features.model_copy(update={
            "asr_no_speech_prob": result.no_speech_prob, "asr_avg_logprob": result.avg_logprob,
            "asr_compression_ratio": result.compression_ratio})
        if result.text:
            m.transcript = result.text
            m.transcript_source = models.transcriber.model_name
            m.segments = list(result.segments)
        m.language = m.language or result.language
    return [m for m in measured if id(m) not in dropped]


def _add_rates(measured: list[Measured], config: RunConfig, acc: ShardTally) -> None:
    """Words/syllables per second for Whisper transcripts, phonemes per second for every transcript."""
    t0 = time.perf_counter()
    for m in measured:
        if m.transcript_source not in (None, "corpus"):
            wps, sps = speaking_rates(m.transcript, m.features.speech_duration_s)
            m.features = m.features.model_copy(update={"speaking_rate_wps": wps, "speaking_rate_sps": sps})
    if config.features.phoneme_rate:
        by_language: dict[str | None, list[Measured]] = {}
        for m in measured:
            if m.transcript:
                by_language.setdefault(m.language, []).append(m)
        for language, group in by_language.items():
            counts = phoneme_counts([m.transcript for m in group], language or "en")
            for m, count in zip(group, counts, strict=True):
                pps = phoneme_rate(count, m.features.speech_duration_s)
                m.features = m.features.model_copy(update={"speaking_rate_pps": pps})
    acc.stage_seconds["phonemes"] += time.perf_counter() - t0


def _classify(measured: list[Measured], models: LoadedModels, acc: ShardTally) -> list[Measured]:
    """Each configured classifier over the batch; a clip one of them fails on is quarantined."""
    for classifier in models.classifiers:
        if not measured:
            break
        t0 = time.perf_counter()
        with acc.gate("classify"), models.lock(f"classifier.{classifier.attribute}"):
            results = classifier.classify([m.audio.samples for m in measured])
        acc.stage_seconds["classify"] += time.perf_counter() - t0
        kept: list[Measured] = []
        for m, result in zip(measured, results, strict=True):
            if isinstance(result, QuarantineError):
                quarantine(acc, m.clip, result.stage, result.reason, f"{m.clip.audio_uri}: {result.message}")
            else:
                m.predictions[classifier.attribute] = result
                kept.append(m)
        measured = kept
    return measured
