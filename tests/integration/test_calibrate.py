"""Bin calibration on real audio: espeak-ng speech at known speeds, the sample corpus, broken clips.

The claim under test: calibrated bins keep the shipped words, give each word about the same share
of the corpus a run describes, and are reproducible; a run that names them records their version.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from flows.generate import run_plain
from schemas.config import RunConfig, load_config, parse_config
from storage.objectstore import open_store
from storage.versions import file_key
from tasks.calibrate import (
    bins_json,
    calibrate,
    calibrate_scale,
    comparison_markdown,
    quantile_edges,
    sample_refs,
    write_bins,
)
from tasks.describe import BinScale, load_bins
from tests.support.corrupt_zoo import build_zoo
from tests.support.datasets_support import sample_config
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3
from tests.support.speech import SR, TEXT

SPEEDS = list(range(90, 390, 20))  # espeak-ng words per minute: 15 clips, ~2.5 to ~9.7 syllables/s
SPEED = "Speaking speed"


@pytest.fixture(scope="module")
def synth_corpus(espeak, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 espeak-ng clips of one sentence at spread speeds and pitches, plus one corrupt file."""
    root = tmp_path_factory.mktemp("synth")
    (root / "audio").mkdir()
    rows = []
    for i, speed in enumerate(SPEEDS):
        name = f"audio/s{speed:03d}.wav"
        sf.write(root / name, espeak("-v", "en", "-s", str(speed), "-p", str(10 + (i * 37) % 80)), SR)
        rows.append({"id": f"s{speed:03d}", "path": name, "transcript": TEXT})
    (root / "audio" / "broken.wav").write_text("not audio, a text file renamed .wav\n" * 20)
    rows.append({"id": "broken", "path": "audio/broken.wav", "transcript": TEXT})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


def synth_config(manifest: Path, root: Path, *overrides: str) -> RunConfig:
    return parse_config({"sources": [{"path": str(manifest), "dataset": "synth", "language": "en"}],
                         "output": {"root": str(root), "dataset": "synth", "shard_size": 8}},
                        list(overrides), environ={})


def committed_rows(config: RunConfig) -> list[dict]:
    manifest = run_plain(config)
    base = Path(config.output.root)
    return [r for s in manifest.shards for r in pq.read_table(base / file_key(manifest, s)).to_pylist()]


# --------------------------------------------------------------------------- edges (plain functions)

def test_quantile_edges_equal_share_ties_and_constants() -> None:
    assert quantile_edges([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == ([3.67, 6.33], False)
    edges, nudged = quantile_edges([5.0] * 8 + [7.0], 3) or ([], False)
    assert nudged and edges == [5.0, 5.01]  # tied quantiles nudged apart, strictly ascending
    assert quantile_edges([100.0] * 10, 5) is None  # nothing to split: caller keeps the source scale
    default = BinScale(edges=[1.0, 2.0], words=["a", "b", "c"])
    scale, report = calibrate_scale("x", "f", default, [0.5, 1.5], min_clips=3)
    assert scale == default and not report.calibrated and "only 2 clips (< 3)" in report.detail


# --------------------------------------------------------------------------- synthetic speech

def test_calibrated_speed_words_split_a_spread_corpus_evenly(synth_corpus: Path, tmp_path: Path) -> None:
    default = load_bins(None)
    cal = calibrate(synth_config(synth_corpus, tmp_path), max_clips=100, min_clips_per_scale=5)
    # The corrupt file is skipped and counted, never fatal.
    assert (cal.corpus_clips, cal.sampled, cal.measured) == (16, 16, 15)
    assert cal.skipped == {"unreadable": 1}
    path = write_bins(cal.bins, str(tmp_path / "bins" / "synth.json"))
    bins = load_bins(path)
    assert bins.version.startswith("calibrated-") and bins.digest
    assert bins.speed.words == default.speed.words and bins.speed.edges != default.speed.edges
    by_name = {r.name: r for r in cal.scales}
    assert by_name["speed"].calibrated and by_name["speed"].clips == 15
    # espeak's voice is male by pitch: no female clips → the shipped female scale, said in the notes.
    assert bins.pitch.scales["female"] == default.pitch.scales["female"]
    assert "pitch.female: 0 clips (only 0 clips (< 5), source scale kept)" in bins.notes
    assert by_name["pitch.male"].calibrated and by_name["pitch.male"].clips == 15
    # Clean synthetic speech: every SNR estimate is the same ceiling → nothing to split, default kept.
    assert not by_name["noise"].calibrated and "all values equal" in by_name["noise"].detail
    assert bins.noise.edges == default.noise.edges
    assert "16 of 16 clips" in bins.notes and "unreadable=1" in bins.notes and default.full_version in bins.notes

    base = synth_config(synth_corpus, tmp_path / "out")
    plain = committed_rows(base)
    calibrated = committed_rows(synth_config(synth_corpus, tmp_path / "out", "output.dataset=synth-cal",
                                             f"describe.bins={path}"))
    assert len(plain) == len(calibrated) == 15
    assert {r["provenance"]["bins_version"] for r in plain} == {default.full_version}
    assert {r["provenance"]["bins_version"] for r in calibrated} == {bins.full_version}
    assert bins.full_version != default.full_version
    words_default = Counter(json.loads(r["attributes"])[SPEED] for r in plain)
    words_calibrated = Counter(json.loads(r["attributes"])[SPEED] for r in calibrated)
    # Equal share: 5 words over 15 clips is 3 each; every word gets at least 2 (> 1/8 of the clips).
    assert set(words_calibrated) == set(bins.speed.words), words_calibrated
    assert all(2 <= n <= 4 for n in words_calibrated.values()), words_calibrated
    # The shipped edges pile the fast half of this corpus into one word.
    assert max(words_default.values()) > max(words_calibrated.values()), (words_default, words_calibrated)


def test_corrupt_clips_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    manifest, expected = build_zoo(tmp_path / "zoo", REPO / "examples" / "sample_corpus")
    config = parse_config({"sources": [{"path": str(manifest), "dataset": "zoo", "language": "en"}],
                           "output": {"root": str(tmp_path / "out"), "dataset": "zoo"}}, environ={})
    cal = calibrate(config, max_clips=100, min_clips_per_scale=3)
    good = sum(reason is None for reason in expected.values())
    assert cal.measured == good
    assert cal.measured + sum(cal.skipped.values()) == cal.sampled == cal.corpus_clips
    for reason in {r for r in expected.values() if r is not None}:
        assert cal.skipped.get(reason, 0) >= 1, (reason, cal.skipped)


# --------------------------------------------------------------------------- determinism

def test_sample_is_chosen_by_clip_id_and_bins_are_byte_identical(tmp_path: Path) -> None:
    config = sample_config(str(tmp_path), "det", workdir=tmp_path)
    first, second = (calibrate(config, max_clips=6, min_clips_per_scale=2) for _ in range(2))
    assert (first.sampled, first.corpus_clips) == (6, 10)
    assert bins_json(first.bins) == bins_json(second.bins)
    assert "digest" not in json.loads(bins_json(first.bins))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_bins(first.bins, str(a))
    write_bins(second.bins, str(b))
    assert a.read_bytes() == b.read_bytes()
    # The sample depends on the ids only: listing the manifest backwards draws the same clips,
    # and a bigger sample contains the smaller one.
    lines = Path(config.sources[0].path).read_text().splitlines()
    backwards = tmp_path / "backwards.jsonl"
    backwards.write_text("\n".join(reversed(lines)) + "\n")
    reordered = config.model_copy(update={"sources": [config.sources[0].model_copy(update={"path": str(backwards)})]})
    ids = {r.id for r in sample_refs(config, 6)[0]}
    assert len(ids) == 6 and ids == {r.id for r in sample_refs(reordered, 6)[0]}
    assert ids < {r.id for r in sample_refs(config, 8)[0]}


@pytest.mark.s3
def test_bins_written_to_the_object_store(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    config = sample_config(str(tmp_path), "s3bins", workdir=tmp_path, s3_endpoint=seaweedfs.endpoint_url,
                           s3_region=seaweedfs.region)
    cal = calibrate(config, max_clips=10, min_clips_per_scale=3)
    root = seaweedfs.root(f"bins-{tmp_path.name}")
    uri = write_bins(cal.bins, f"{root}/calibrated.json", config.s3)
    assert uri == f"{root}/calibrated.json"
    assert open_store(root, config.s3).get_bytes("calibrated.json") == bins_json(cal.bins)


# --------------------------------------------------------------------------- flow and CLI

@pytest.mark.usefixtures("prefect_harness")
def test_flow_writes_bins_and_publishes_the_comparison(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.calibrate import CalibrateParams, calibrate_bins

    out = tmp_path / "bins" / "sample.json"
    params = CalibrateParams(config=sample_config(str(tmp_path), "flow", workdir=tmp_path), output=str(out),
                             max_clips=10, min_clips_per_scale=3)
    result = calibrate_bins(params)
    assert result.output == str(out) and load_bins(str(out)).version == result.calibration.bins.version
    assert result.calibration.measured == 10
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["calibrated-bins"])))
    latest = max(found, key=lambda a: a.created)
    markdown = str(latest.data)
    assert result.calibration.bins.version in markdown and str(out) in markdown
    assert "| speed | speaking_rate_sps |" in markdown and "| 2.5, 3.5, 5, 6 |" in markdown  # default edges
    assert markdown == comparison_markdown(result.calibration, str(out))


@pytest.mark.usefixtures("prefect_harness")
def test_cli_calibrate_writes_the_file_and_says_how_to_use_it(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    quickstart = str(REPO / "examples" / "quickstart.yaml")
    out = tmp_path / "cli-bins.json"
    assert main(["calibrate", quickstart, "--output", str(out), "--max-clips", "8",
                 "--min-clips-per-scale", "3", "--set", f"output.root={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    bins = load_bins(str(out))
    assert f"calibrated bins {bins.version} written to {out}" in printed
    assert "8 of 10 clips" in printed and f"describe.bins: {out}" in printed
    # The file is usable as is: the config loads with it and names it.
    config = load_config(quickstart, [f"describe.bins={out}"], environ={})
    assert load_bins(config.describe.bins).full_version == bins.full_version

    assert main(["calibrate", str(tmp_path / "nope.yaml"), "--output", str(out)]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["calibrate", quickstart, "--output", str(out), "--max-clips", "0"]) == 2
    assert "max_clips" in capsys.readouterr().err
    assert main(["calibrate", quickstart, "--output", str(out), "--set", "sources.0.path=/nonexistent/m.jsonl"]) == 2
