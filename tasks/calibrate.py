"""Corpus-specific bins: measure a deterministic sample, cut each scale at equal-share quantiles.

The shipped bins describe "typical" read speech; on a corpus that is all fast podcasts or all quiet
phone calls most clips land in one word, and the seed stops telling clips apart. Calibration keeps
the shipped words and structure (gendered pitch scales included) and moves only the edges, so each
word gets about the same share of the corpus. Clips are measured by the pipeline's own code, so the
values binned here are exactly the values a run will describe.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from schemas.config import RunConfig, S3Config
from schemas.records import Clip, Features, ReasonCode
from storage.objectstore import open_store
from tasks.describe import Bins, BinScale, FeatureBins, PitchBins, load_bins, stable_int
from tasks.features.models import load_models
from tasks.ingest import ClipRef, SourceError, iter_refs, load_clip, source_fingerprint
from tasks.pipeline import measure_clips

EDGE_DECIMALS = 2  # edges are written rounded: 0.01 Hz / syllables/s / LU / dB is far below what we measure
EDGE_STEP = 10.0**-EDGE_DECIMALS  # how far a tied edge is nudged above the one below it
SAMPLE_SALT = "calibrate/1"  # part of the sampling hash: change it and every corpus draws a new sample


class CalibrationError(ValueError):
    """Nothing to calibrate on: no clips listed, or none of the sampled clips could be measured."""


class ScaleReport(BaseModel):
    """One scale's outcome: how many clips it saw and whether its edges moved."""

    name: str  # "pitch.male", "speed", …
    feature: str
    clips: int
    calibrated: bool
    detail: str = ""  # why the shipped scale was kept, or that tied edges were nudged
    default_edges: list[float]
    edges: list[float]
    words: list[str]


class Calibration(BaseModel):
    bins: Bins
    source_version: str  # full version (with digest) of the bins whose words were kept
    corpus_clips: int
    sampled: int
    measured: int
    skipped: dict[str, int] = Field(default_factory=dict)  # reason code → clips that could not be measured
    scales: list[ScaleReport]


# --------------------------------------------------------------------------- sample + measure

def sample_refs(config: RunConfig, max_clips: int | None) -> tuple[list[ClipRef], int]:
    """At most `max_clips` refs chosen by a stable hash of the clip id (the same on every machine),
    plus how many clips the sources list. Streams the listing; holds only the sample."""
    if max_clips is not None and max_clips < 1:
        raise ValueError(f"max_clips must be at least 1 (or None for every clip), got {max_clips}")
    counted = 0

    def keyed() -> Iterator[tuple[int, str, int, str]]:
        nonlocal counted
        for ref in iter_refs(config.sources):
            counted += 1
            yield stable_int(SAMPLE_SALT, ref.id), ref.id, ref.source, ref.locator

    keys = sorted(keyed()) if max_clips is None else heapq.nsmallest(max_clips, keyed())
    if not counted:
        raise SourceError("the sources list no clips: " + ", ".join(s.path for s in config.sources))
    seen: set[str] = set()
    refs = []
    for _, clip_id, source, locator in keys:
        # A repeated id is one clip to the run (the copies are quarantined): measure it once.
        if clip_id not in seen:
            seen.add(clip_id)
            refs.append(ClipRef(id=clip_id, source=source, locator=locator))
    return sorted(refs, key=lambda r: (r.id, r.source, r.locator)), counted


def _load(ref: ClipRef, config: RunConfig, skipped: Counter[str]) -> Clip | None:
    try:
        return load_clip(ref, config.sources)
    except Exception:  # noqa: BLE001 - one unreadable record must not stop a calibration
        skipped[ReasonCode.bad_row.value] += 1
        return None


def measure(config: RunConfig, refs: Sequence[ClipRef], bins: Bins, batch_size: int = 64,
            ) -> tuple[list[Features], dict[str, int]]:
    """Features of each clip exactly as a run resolves them (DSP, Whisper rates, classifiers, labels),
    through the pipeline's own per-batch code; clips it would quarantine are counted by reason."""
    models = load_models(config.features)
    skipped: Counter[str] = Counter()
    features: list[Features] = []
    for start in range(0, len(refs), batch_size):
        clips = [c for ref in refs[start:start + batch_size] if (c := _load(ref, config, skipped)) is not None]
        measured, dropped = measure_clips(clips, config, bins, models)
        features += measured
        skipped.update(q.reason_code.value for q in dropped)
    return features, dict(sorted(skipped.items()))


# --------------------------------------------------------------------------- edges

def quantile_edges(values: Sequence[float], words: int) -> tuple[list[float], bool] | None:
    """Edges giving each of `words` words an equal share of `values`, rounded and strictly ascending;
    the flag says a tie had to be nudged. None when the values cannot be split (all equal)."""
    data = np.asarray(values, dtype=np.float64)
    if words < 2 or data.size == 0 or float(data.max()) == float(data.min()):
        return None
    qs = np.quantile(data, [i / words for i in range(1, words)])
    edges = [round(float(q), EDGE_DECIMALS) for q in qs]
    nudged = False
    for i in range(1, len(edges)):
        if edges[i] <= edges[i - 1]:
            edges[i] = round(edges[i - 1] + EDGE_STEP, EDGE_DECIMALS)
            nudged = True
    return edges, nudged


def calibrate_scale(name: str, feature: str, default: BinScale, values: Sequence[float],
                    min_clips: int) -> tuple[BinScale, ScaleReport]:
    """One scale: equal-share edges over `values`, or the source scale when they are too few or all equal."""
    report = ScaleReport(name=name, feature=feature, clips=len(values), calibrated=False,
                         default_edges=list(default.edges), edges=list(default.edges), words=list(default.words))
    if len(values) < min_clips:
        report.detail = f"only {_clips(len(values))} (< {min_clips}), source scale kept"
        return default.model_copy(), report
    cut = quantile_edges(values, len(default.words))
    if cut is None:
        report.detail = "all values equal, source scale kept"
        return default.model_copy(), report
    edges, nudged = cut
    report.calibrated, report.edges = True, edges
    report.detail = "tied edges nudged apart" if nudged else ""
    return BinScale(edges=edges, words=list(default.words)), report


def _clips(n: int) -> str:
    return f"{n} clip" if n == 1 else f"{n} clips"


def _values(features: Sequence[Features], feature: str, gender: str | None = None) -> list[float]:
    out = []
    for f in features:
        value = getattr(f, feature, None)
        if value is not None and (gender is None or f.gender == gender):
            out.append(float(value))
    return out


def calibrate_bins(base: Bins, features: Sequence[Features], min_clips: int,
                   ) -> tuple[PitchBins, dict[str, FeatureBins], list[ScaleReport]]:
    """Every scale of `base` re-cut on `features`, words and structure unchanged.

    A gendered pitch scale uses the clips of that gender; `unknown` (used for a clip whose gender is
    not known, so a voice of either) uses every clip with a pitch.
    """
    reports: list[ScaleReport] = []
    scales: dict[str, BinScale] = {}
    for key, default in base.pitch.scales.items():
        values = _values(features, base.pitch.feature, None if key == "unknown" else key)
        scales[key], report = calibrate_scale(f"pitch.{key}", base.pitch.feature, default, values, min_clips)
        reports.append(report)
    others: dict[str, FeatureBins] = {}
    for name in ("speed", "volume", "noise"):
        fb: FeatureBins = getattr(base, name)
        scale, report = calibrate_scale(name, fb.feature, fb, _values(features, fb.feature), min_clips)
        others[name] = FeatureBins(feature=fb.feature, edges=scale.edges, words=scale.words)
        reports.append(report)
    return PitchBins(feature=base.pitch.feature, scales=scales), others, reports


# --------------------------------------------------------------------------- the whole calibration

def calibrate(config: RunConfig, max_clips: int | None = 2000, min_clips_per_scale: int = 20,
              base_bins: str | None = None) -> Calibration:
    """Measure a deterministic sample of the config's sources and return calibrated bins.

    `base_bins` (a bins file; default the shipped ones) gives the words and the fallback scales.
    It is deliberately not `config.describe.bins`: that usually names the file being calibrated.
    """
    base = load_bins(base_bins)
    refs, corpus_clips = sample_refs(config, max_clips)
    features, skipped = measure(config, refs, base)
    if not features:
        reasons = ", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"
        raise CalibrationError(f"none of the {len(refs)} sampled clips could be measured ({reasons}); "
                               "check the corpus with `speechpairs run` and its quarantine")
    pitch, others, reports = calibrate_bins(base, features, min_clips_per_scale)
    version = f"calibrated-{source_fingerprint(config.sources)[:8]}"
    bins = Bins(version=version, notes=_notes(base, corpus_clips, len(refs), len(features), skipped, reports,
                                              max_clips, min_clips_per_scale),
                pitch=pitch, speed=others["speed"], volume=others["volume"], noise=others["noise"])
    return Calibration(bins=bins, source_version=base.full_version, corpus_clips=corpus_clips,
                       sampled=len(refs), measured=len(features), skipped=skipped, scales=reports)


def _notes(base: Bins, corpus: int, sampled: int, measured: int, skipped: dict[str, int],
           reports: list[ScaleReport], max_clips: int | None, min_clips: int) -> str:
    skip = ", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"
    per_scale = "; ".join(f"{r.name}: {_clips(r.clips)}" + (f" ({r.detail})" if r.detail else "")
                          for r in reports)
    return (f"Calibrated from {base.full_version} (its words kept): equal-share quantile edges. "
            f"Sample: {sampled} of {corpus} clips, chosen by a stable hash of the clip id "
            f"(max_clips={max_clips}); {measured} measured, skipped: {skip}. "
            f"Pitch scales per gender on clips of that gender, 'unknown' on every clip; a scale with "
            f"fewer than {min_clips} clips keeps the source scale. Per scale: {per_scale}.")


# --------------------------------------------------------------------------- output

def bins_json(bins: Bins) -> bytes:
    """The file `load_bins` reads, laid out like the shipped one (edges and words on one line each);
    no `digest`: load_bins computes it from these bytes."""
    return (_layout(bins.model_dump(mode="json", exclude={"digest"})) + "\n").encode()


def _layout(value: object, indent: int = 0) -> str:
    if isinstance(value, dict) and value:
        pad = " " * (indent + 2)
        items = ",\n".join(f"{pad}{json.dumps(k)}: {_layout(v, indent + 2)}" for k, v in value.items())
        return "{\n" + items + "\n" + " " * indent + "}"
    return json.dumps(value, ensure_ascii=False)


def write_bins(bins: Bins, output: str, s3: S3Config | None = None) -> str:
    """Write the bins file to a local path or an s3:// key; returns where it landed (absolute)."""
    if output.startswith("s3://"):
        root, _, key = output.rstrip("/").rpartition("/")
        if root == "s3:/" or not key:
            raise ValueError(f"bins output {output!r}: use s3://bucket/[prefix/]file.json")
    else:
        path = Path(output.removeprefix("file://")).expanduser().absolute()
        root, key = str(path.parent), path.name
    store = open_store(root, s3)
    store.put_bytes(key, bins_json(bins))
    return store.uri(key)


def comparison_markdown(cal: Calibration, output: str | None = None) -> str:
    """Default vs calibrated edges per scale, for the Prefect UI and the CLI."""
    skip = ", ".join(f"{k}={v}" for k, v in cal.skipped.items()) or "none"
    lines = [f"# Calibrated bins `{cal.bins.version}`", ""]
    if output:
        lines += [f"Written to `{output}`; use it with `describe.bins: {output}`.", ""]
    lines += [(f"Source bins `{cal.source_version}`; sample {cal.sampled} of {cal.corpus_clips} clips, "
               f"{cal.measured} measured, skipped: {skip}."), "",
              "| scale | feature | clips | words | default edges | calibrated edges | note |",
              "|---|---|---:|---|---|---|---|"]
    for r in cal.scales:
        words = " / ".join(r.words)
        default = ", ".join(f"{e:g}" for e in r.default_edges)
        edges = ", ".join(f"{e:g}" for e in r.edges) if r.calibrated else "(source kept)"
        lines.append(f"| {r.name} | {r.feature} | {r.clips} | {words} | {default} | {edges} | {r.detail} |")
    return "\n".join(lines) + "\n"
