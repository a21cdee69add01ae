"""Numbers → words → seed description (the instruction for each clip: tasks/instructions.py).

Bins are a versioned JSON file (shipped defaults in tasks/resources/bins_v1.json, or a calibrated
file named in the config); the version string recorded on every row includes a hash of the file,
so two runs with different edges never look alike.

A seed lists the canonical attributes (`describe.attributes`, normalised words) and then the
corpus's own labels in its own words (the source's `seed_labels`, DeSTA2.5's `Act: Inform`,
`Intensity: strong`); every name and value passes `sanitize_prompt_text`, and each display name
records where its words came from (`attribute_sources`). A clip holding several supervisions
(lhotse) gets one `[start-end] text (attributes)` span per supervision, each span's attributes
from that speaker's labels and from pitch/volume/rate measured on that span's samples. A clip of a non-speech source
(`sources[].speech: false`) gets a labels-only seed: no transcript, no voice attributes (`without_voice`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, model_validator

from schemas.attributes import ATTRIBUTE_LABELS, SPAN_ATTRIBUTES, SeedLabel
from schemas.config import FeaturesConfig
from schemas.records import Features, Segment
from tasks.features.labels import ATTRIBUTES, corpus_label_key, is_no_label, resolve_attributes
from tasks.llm.messages import sanitize_prompt_text

DESCRIBE_VERSION = "describe/3"  # 2: corpus seed labels, multi-span seeds, sanitised names/values; 3: NFKC


class BinScale(BaseModel):
    edges: list[float]
    words: list[str]

    @model_validator(mode="after")
    def _shape(self) -> BinScale:
        if len(self.words) != len(self.edges) + 1:
            raise ValueError(f"bins need len(words) == len(edges) + 1, got {len(self.words)} and {len(self.edges)}")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"bin edges must be strictly ascending: {self.edges}")
        return self

    def word(self, value: float) -> str:
        return self.words[bisect.bisect_right(self.edges, value)]


class PitchBins(BaseModel):
    feature: str = "pitch_mean_hz"
    scales: dict[str, BinScale]


class FeatureBins(BinScale):
    feature: str


class Bins(BaseModel):
    version: str
    notes: str = ""
    pitch: PitchBins
    speed: FeatureBins
    volume: FeatureBins
    noise: FeatureBins
    digest: str = ""

    @property
    def full_version(self) -> str:
        return f"{self.version}+{self.digest[:8]}"


@lru_cache(maxsize=8)
def load_bins(path: str | None = None) -> Bins:
    """The bins file at `path`, or the shipped defaults; the digest pins its exact content."""
    if path is None:
        raw = resources.files("tasks.resources").joinpath("bins_v1.json").read_bytes()
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"describe.bins: no bins file at {path}")
        raw = p.read_bytes()
    data = json.loads(raw)
    data["digest"] = hashlib.sha256(raw).hexdigest()
    return Bins.model_validate(data)


def _title(value: str) -> str:
    value = " ".join(value.replace("_", " ").split())
    return value[:1].upper() + value[1:] if value else value


def attribute_words(features: Features, bins: Bins, order: Sequence[str]) -> dict[str, str]:
    """Seed attributes in config order, display label → word; unknown attributes are left out."""
    out: dict[str, str] = {}
    for key in order:
        word = _attribute_word(key, features, bins)
        word = sanitize_prompt_text(word, "value") if word else None
        if word:
            out[ATTRIBUTE_LABELS[key]] = word
    return out


@dataclass
class Described:
    """What goes into one seed (or one span of it): display name → word, and → where it came from."""

    words: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def attribute_source(key: str, features: Features, labels: Mapping[str, str], bins: Bins) -> str:
    """Where canonical attribute `key`'s word came from: `labels.<column>`, `classifier:<model>`,
    `pitch_heuristic`, or the measured `features.<field>` it was binned from."""
    if key in ATTRIBUTES:
        source = getattr(features, f"{key}_source", None) or "corpus"
        if source == "corpus":
            column = corpus_label_key(key, labels)
            return f"labels.{column}" if column else source
        return str(source)
    if key == "pitch":
        return f"features.{bins.pitch.feature}"
    if key in ("speed", "volume", "noise"):
        fb: FeatureBins = getattr(bins, key)
        return f"features.{fb.feature}"
    return {"reverb": "features.c50_db", "duration": "features.duration_s"}.get(key, "features")


def _find_label(labels: Mapping[str, str], name: str) -> str | None:
    if name in labels:
        return name
    low = name.lower()
    return next((key for key in labels if key.lower() == low), None)


def seed_label_words(labels: Mapping[str, str], seed_labels: Iterable[SeedLabel],
                     taken: Iterable[str] = ()) -> Described:
    """The corpus labels named by `seed_labels`, in that order, verbatim but sanitised and capped.

    A label the clip lacks, or whose value says "no label" (`unk`, `n/a`, …) or maps to "" in
    `values`, is left out; so is one whose display name is already `taken` (case-insensitive) by
    a canonical attribute with a value, so no name appears twice in a seed.
    """
    out = Described()
    used = {name.lower() for name in taken}
    for entry in seed_labels:
        if entry.display.lower() in used:
            continue
        key = _find_label(labels, entry.label)
        raw = labels.get(key) if key is not None else None
        if key is None or raw is None or is_no_label(raw):
            continue
        if entry.values is not None:
            raw = entry.values.get(raw, entry.values.get(raw.strip(), raw))
        word = sanitize_prompt_text(raw, "value")
        if word:
            out.words[entry.display] = word
            out.sources[entry.display] = f"labels.{key}"
            used.add(entry.display.lower())
    return out


def describe_attributes(features: Features, labels: Mapping[str, str], bins: Bins, order: Sequence[str],
                        seed_labels: Iterable[SeedLabel] = (), taken: Iterable[str] = ()) -> Described:
    """Canonical attributes in `order`, then the corpus's `seed_labels`, with their sources."""
    words = attribute_words(features, bins, order)
    keys = {ATTRIBUTE_LABELS[k]: k for k in order}
    out = Described(words, {name: attribute_source(keys[name], features, labels, bins) for name in words})
    corpus = seed_label_words(labels, seed_labels, [*words, *taken])
    out.words.update(corpus.words)
    out.sources.update(corpus.sources)
    return out


MIN_SPAN_S = 0.1  # a shorter span gets label attributes only (no pitch/volume/rate measured on it)


@dataclass
class SpanSeed:
    """A multi-span seed's parts: each span with its own attributes, the whole clip's, and all merged."""

    spans: list[Segment]
    clip: Described  # noise, reverb, duration and clip-level seed labels (the whole-clip span)
    merged: Described  # every name once, distinct values joined by ", " (the row's attributes, QC)


def describe_multi_span(features: Features, clip_labels: Mapping[str, str], spans: Sequence[Segment],
                        samples: np.ndarray, sr: int, bins: Bins, order: Sequence[str],
                        seed_labels: Sequence[SeedLabel], features_config: FeaturesConfig) -> SpanSeed:
    """Attributes per supervision span and for the whole clip.

    A span gets the speaker attributes of `order` (gender, emotion, age, accent from its own labels;
    pitch, speed, volume measured on its samples, `features_config` as for whole clips) and then
    those `seed_labels` its labels hold. The clip keeps the rest of `order` (noise, reverb,
    duration, measured on the clip) and the seed labels no span holds. Clip-level classifier
    predictions never speak for a span: a prediction over several voices is no one's.
    """
    span_order = [k for k in order if k in SPAN_ATTRIBUTES]
    span_keys = {key.lower() for span in spans for key in span.labels}
    described: list[Segment] = []
    parts: list[Described] = []
    for span in spans:
        labels = {**clip_labels, **span.labels}
        first, last = max(0, round(span.start_s * sr)), min(len(samples), round(span.end_s * sr))
        if last - first >= MIN_SPAN_S * sr:
            from tasks.features import extract_features  # DSP (scipy) only when a span is measured

            span_features = extract_features(samples[first:last], sr, span.text, labels, features_config)
        else:
            span_features = Features(duration_s=max(0.0, span.end_s - span.start_s))
        span_features = resolve_attributes(span_features, labels, {}, {})
        own = [s for s in seed_labels if s.label.lower() in {k.lower() for k in span.labels}]
        part = describe_attributes(span_features, labels, bins, span_order, own)
        described.append(span.model_copy(update={"attributes": part.words}))
        parts.append(part)
    taken = [name for part in parts for name in part.words]
    clip_order = [k for k in order if k not in SPAN_ATTRIBUTES]
    clip_only = [s for s in seed_labels if s.label.lower() not in span_keys]
    clip = describe_attributes(features, clip_labels, bins, clip_order, clip_only, taken)
    return SpanSeed(described, clip, merge_described([*parts, clip]))


def merge_described(parts: Iterable[Described]) -> Described:
    """One name → the distinct words (and sources) of every part, in order, joined by ", "."""
    words: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    for part in parts:
        for name, word in part.words.items():
            if word not in words.setdefault(name, []):
                words[name].append(word)
            source = part.sources.get(name)
            if source and source not in sources.setdefault(name, []):
                sources[name].append(source)
    return Described({k: ", ".join(v) for k, v in words.items()},
                     {k: ", ".join(v) for k, v in sources.items() if v})


def _attribute_word(key: str, f: Features, bins: Bins) -> str | None:
    if key == "gender":
        return _title(f.gender) if f.gender else None
    if key in ("emotion", "age", "accent"):
        # Already resolved (corpus label > classifier) and normalised by features.labels.
        value = getattr(f, key)
        return _title(value) if value else None
    if key == "pitch":
        if f.pitch_mean_hz is None:
            return None
        scale = bins.pitch.scales.get(f.gender or "unknown") or bins.pitch.scales["unknown"]
        return scale.word(f.pitch_mean_hz)
    if key in ("speed", "volume", "noise"):
        fb: FeatureBins = getattr(bins, key)
        value = getattr(f, fb.feature)
        return fb.word(value) if value is not None else None
    if key == "reverb":
        return None if f.c50_db is None else f"{f.c50_db:.0f} dB C50"  # no parentheses inside the list
    if key == "duration":
        return None if f.duration_s is None else f"{max(1, round(f.duration_s))} seconds"
    return None


def format_timestamp(seconds: float, fmt: str) -> str:
    """DeSTA2: HH:MM:SS; DeSTA2.5: MM:SS (minutes may exceed 59 for long clips)."""
    total = max(0, round(seconds))
    if fmt == "desta2":
        return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
    return f"{total // 60:02d}:{total % 60:02d}"


def prompt_transcript(transcript: str | None, attributes: Mapping[str, str],
                      segments: Sequence[Segment] | None = None) -> str | None:
    """The transcript as the seed shows it (sanitised with the seed's attribute names), for the LLM
    request and QC: a response quoting the words it was shown must match them, and the template
    backend must never copy a chat token or a forged span from the raw text into a response."""
    names = [*attributes, *(k for seg in segments or () for k in seg.attributes)]
    return sanitize_prompt_text(transcript, labels=names) or None


# What only a voice has: a non-speech source's seed (sources[].speech: false) leaves these out,
# as well as a gender guessed from pitch (a corpus gender label still counts).
VOICE_FEATURES = ("pitch_mean_hz", "pitch_std_hz", "speaking_rate_wps", "speaking_rate_sps", "speaking_rate_pps")


def without_voice(features: Features) -> Features:
    """A non-speech clip's features: no pitch, no speaking rate, no gender from the pitch heuristic
    (a dog's bark has a pitch, not a speaker gender), so its labels-only seed claims no voice."""
    update: dict[str, object] = dict.fromkeys(VOICE_FEATURES)
    if features.gender_source == "pitch_heuristic":
        update.update(gender=None, gender_score=None, gender_source=None)
    return features.model_copy(update=update)


def _span(start_s: float, end_s: float, fmt: str) -> str:
    start, end = format_timestamp(start_s, fmt), format_timestamp(end_s, fmt)
    return f"[{start} - {end}]" if fmt == "desta2" else f"[{start}-{end}]"


def _attribute_list(attributes: Mapping[str, str]) -> str:
    pairs = [(sanitize_prompt_text(k, "name"), sanitize_prompt_text(v, "value")) for k, v in attributes.items()]
    pairs = [(k, v) for k, v in pairs if k and v]
    return "(" + ", ".join(f"{k}: {v}" for k, v in pairs) + ")" if pairs else ""


def seed_description(transcript: str | None, duration_s: float, attributes: Mapping[str, str],
                     fmt: str = "desta25", segments: Sequence[Segment] | None = None) -> str:
    """`[00:00-00:05] text (Gender: Female, ...)`; without a transcript, labels only in parentheses.

    With `segments` (Whisper's), each gets its own span: `[00:00-00:02] one [00:02-00:05] two (...)`.
    When segments carry their own attributes (the supervisions of a multi-speaker clip), each span
    gets its own list and the clip-wide `attributes` a labels-only span over the whole clip first:
    `[00:00-00:06] (Noise level: Low) [00:00-00:03] hi (Gender: Male) [00:03-00:06] yes (Gender: Female)`.
    Every text, name and value passes `sanitize_prompt_text` here, so no caller can forge structure.
    """
    names = [*attributes, *(k for seg in segments or () for k in seg.attributes)]
    if segments and any(seg.attributes for seg in segments):
        return _span_seed(duration_s, attributes, segments, fmt, names)
    texts = [(seg, sanitize_prompt_text(seg.text, labels=names)) for seg in segments or ()]
    texts = [(seg, t) for seg, t in texts if t]
    if texts:
        parts = [f"{_span(seg.start_s, max(seg.end_s, seg.start_s + 1.0), fmt)} {t}" for seg, t in texts]
    else:
        parts = [_span(0, max(duration_s, 1.0), fmt)]
        text = sanitize_prompt_text(transcript, labels=names)
        if text:
            parts.append(text)
    listed = _attribute_list(attributes)
    if listed:
        parts.append(listed)
    return " ".join(parts)


def _span_seed(duration_s: float, attributes: Mapping[str, str], segments: Sequence[Segment], fmt: str,
               names: Sequence[str]) -> str:
    parts: list[str] = []
    listed = _attribute_list(attributes)
    if listed:
        parts.append(f"{_span(0, max(duration_s, 1.0), fmt)} {listed}")
    for seg in sorted(segments, key=lambda s: (s.start_s, s.end_s)):
        pieces = [_span(seg.start_s, max(seg.end_s, seg.start_s + 1.0), fmt),
                  sanitize_prompt_text(seg.text, labels=names), _attribute_list(seg.attributes)]
        parts.append(" ".join(p for p in pieces if p))
    return " ".join(parts)


def stable_int(*parts: object) -> int:
    """A 63-bit integer from the parts, the same on every machine and run (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
