"""Numbers → words → seed description, and the instruction for each clip.

Bins are a versioned JSON file (shipped defaults in tasks/resources/bins_v1.json, or a calibrated
file named in the config); the version string recorded on every row includes a hash of the file,
so two runs with different edges never look alike.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, model_validator

from schemas.attributes import ATTRIBUTE_LABELS
from schemas.config import DEFAULT_INSTRUCTION, DescribeConfig
from schemas.records import Features, Segment

DESCRIBE_VERSION = "describe/1"


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
        if word:
            out[ATTRIBUTE_LABELS[key]] = word
    return out


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
        return None if f.c50_db is None else f"{f.c50_db:.0f} dB (C50)"
    if key == "duration":
        return None if f.duration_s is None else f"{max(1, round(f.duration_s))} seconds"
    return None


def format_timestamp(seconds: float, fmt: str) -> str:
    """DeSTA2: HH:MM:SS; DeSTA2.5: MM:SS (minutes may exceed 59 for long clips)."""
    total = max(0, round(seconds))
    if fmt == "desta2":
        return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"
    return f"{total // 60:02d}:{total % 60:02d}"


def _span(start_s: float, end_s: float, fmt: str) -> str:
    start, end = format_timestamp(start_s, fmt), format_timestamp(end_s, fmt)
    return f"[{start} - {end}]" if fmt == "desta2" else f"[{start}-{end}]"


def seed_description(transcript: str | None, duration_s: float, attributes: Mapping[str, str],
                     fmt: str = "desta25", segments: Sequence[Segment] | None = None) -> str:
    """`[00:00-00:05] text (Gender: Female, ...)`; without a transcript, labels only in parentheses.

    With `segments` (Whisper's), each gets its own span: `[00:00-00:02] one [00:02-00:05] two (...)`.
    """
    texts = [(seg, " ".join(seg.text.split())) for seg in segments or ()]
    texts = [(seg, t) for seg, t in texts if t]
    if texts:
        parts = [f"{_span(seg.start_s, max(seg.end_s, seg.start_s + 1.0), fmt)} {t}" for seg, t in texts]
    else:
        parts = [_span(0, max(duration_s, 1.0), fmt)]
        text = " ".join(transcript.split()) if transcript else ""
        if text:
            parts.append(text)
    if attributes:
        parts.append("(" + ", ".join(f"{k}: {v}" for k, v in attributes.items()) + ")")
    return " ".join(parts)


@lru_cache(maxsize=8)
def load_instruction_pool(path: str | None) -> tuple[str, ...]:
    """One instruction a line (blank lines and # comments skipped); default: DeSTA2's single one."""
    if path is None:
        return (DEFAULT_INSTRUCTION,)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"describe.instruction_pool: no file at {path}")
    pool = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))
    if not pool:
        raise ValueError(f"describe.instruction_pool: {path} has no instructions")
    return pool


BUILTIN_POOL = "instructions_v1.txt"


def instruction_pool(config: DescribeConfig) -> tuple[str, ...]:
    """The configured pool: a file, `builtin` (the shipped, versioned pool), or the single instruction."""
    if config.instruction_pool == "builtin":
        return load_instruction_pool(str(resources.files("tasks.resources").joinpath(BUILTIN_POOL)))
    return load_instruction_pool(config.instruction_pool) if config.instruction_pool else (config.instruction,)


def pool_hash(pool: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(pool).encode()).hexdigest()[:16]


def stable_int(*parts: object) -> int:
    """A 63-bit integer from the parts, the same on every machine and run (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def pick_instruction(pool: Sequence[str], seed: int, clip_id: str) -> str:
    """Deterministic per (seed, clip id): re-runs and resumed shards ask the same question."""
    return pool[stable_int(seed, clip_id) % len(pool)]
