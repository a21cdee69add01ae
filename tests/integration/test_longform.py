"""Long recordings become clips inside a run (issue 14 parts 2, 3, 5).

Recordings are built here from real sample clips (examples/sample_corpus) and espeak-ng sentences
with known silences between them, so each utterance's span and words are known; an SRT sidecar
(next to the audio of a folder source) and a TextGrid (named by a clip-list row's `timestamps`)
carry those words and times. A run with the `rules` backend must give segments within
[min_s, max_s], ids `<recording>@<ms>-<ms>` identical on a second run, the words inside each
segment's span as its transcript, the recording as `audio_uri`, the offset of the id, and the
recording's very samples as the row's audio.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from flows.generate import run_generate
from schemas.arrow import ROW_SCHEMA
from schemas.config import RunConfig, parse_config
from storage.objectstore import open_store
from storage.versions import file_key, read_manifest
from tests.support.longform import Recording, build_recording, write_srt
from tests.support.paths import REPO
from tests.support.speech import SENTENCES, SR, load_16k, trim_quiet
from tests.support.stored import stored_rows

SAMPLES = REPO / "examples" / "sample_corpus"
ID = re.compile(r"^(?P<rec>.+)@(?P<start>\d+)-(?P<end>\d+)$")

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def utterances(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[np.ndarray, str]]:
    """Trimmed real sample clips with their corpus transcripts, and espeak-ng sentences (16 kHz)."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    folder = tmp_path_factory.mktemp("espeak")
    out: list[tuple[np.ndarray, str]] = []
    for i, text in enumerate(SENTENCES):
        wav = folder / f"s{i}.wav"
        subprocess.run([binary, "-w", str(wav), "-s", "160", text], check=True, capture_output=True)
        out.append((trim_quiet(load_16k(wav)), text))
    for line in (SAMPLES / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("transcript") and row["path"].endswith((".wav", ".flac")):
            out.append((trim_quiet(load_16k(SAMPLES / row["path"])), row["transcript"]))
    return out


def write_textgrid(path: Path, rec: Recording) -> None:
    """A long-form TextGrid with one `utterances` tier: an interval per utterance, empty ones between."""
    end = len(rec.samples) / SR
    edges: list[tuple[float, float, str]] = []
    t = 0.0
    for u in rec.utterances:
        if u.start_s > t:
            edges.append((t, u.start_s, ""))
        edges.append((u.start_s, u.end_s, u.text))
        t = u.end_s
    if t < end:
        edges.append((t, end, ""))
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {end}",
             "tiers? <exists>", "size = 1", "item []:", "    item [1]:", '        class = "IntervalTier"',
             '        name = "utterances"', "        xmin = 0", f"        xmax = {end}",
             f"        intervals: size = {len(edges)}"]
    for i, (a, b, text) in enumerate(edges, 1):
        lines += [f"        intervals [{i}]:", f"            xmin = {a}", f"            xmax = {b}",
                  f'            text = "{text}"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, utterances: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    """A folder source (rec_a.wav + rec_a.srt, ~75 s) and a clip list (rec_b.wav, its TextGrid named by
    `timestamps`, ~60 s; and a short sample clip that stays whole)."""
    root = tmp_path_factory.mktemp("longform")
    rec_a = build_recording(root / "talks" / "rec_a.wav", utterances, seed=1, seconds=75)
    write_srt(root / "talks" / "rec_a.srt", rec_a)
    rec_b = build_recording(root / "list" / "audio" / "rec_b.wav", utterances, seed=2, seconds=60)
    (root / "list" / "timing").mkdir()
    write_textgrid(root / "list" / "timing" / "rec_b_words.TextGrid", rec_b)
    shutil.copy(SAMPLES / "audio" / "arctic_slt_a0009.wav", root / "list" / "audio" / "short.wav")
    rows = [{"id": "rec_b", "path": "audio/rec_b.wav", "timestamps": "timing/rec_b_words.TextGrid"},
            {"id": "short", "path": "audio/short.wav", "transcript": "he turned sharply"}]
    (root / "list" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "recordings": {"talks/rec_a": rec_a, "list/rec_b": rec_b}}


def longform_config(corpus: dict[str, Any], out: Path, **extra: Any) -> RunConfig:
    root = corpus["root"]
    data: dict[str, Any] = {
        "sources": [{"path": str(root / "talks"), "dataset": "talks", "language": "en"},
                    {"path": str(root / "list" / "manifest.jsonl"), "dataset": "list", "language": "en"}],
        "output": {"root": str(out), "dataset": "longform", "shard_size": 2},
        "segment": {"min_s": 2.0, "max_s": 20.0, "vad": "energy", "min_silence_s": 0.3},
        "llm": {"backend": "rules"},
    }
    data.update(extra)
    return parse_config(data)


def committed(out: Path, dataset: str, version: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    store = open_store(str(out))
    manifest = read_manifest(store, dataset, version)
    for shard in manifest.shards:
        assert pq.read_schema(out / file_key(manifest, shard)).equals(ROW_SCHEMA)
    rows = list(stored_rows(store, manifest).values())
    quarantined: list[dict[str, Any]] = []
    for part in manifest.quarantine:
        quarantined += pq.read_table(out / file_key(manifest, part)).to_pylist()
    return rows, quarantined


@pytest.fixture(scope="module")
def first_run(corpus: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("out1")
    summary = run_generate(longform_config(corpus, out))
    rows, quarantined = committed(out, "longform", summary.version)
    return {"summary": summary, "rows": rows, "quarantined": quarantined, "out": out}


def _segment_rows(rows: list[dict[str, Any]], rec: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["id"].startswith(rec + "@")), key=lambda r: int(ID.match(r["id"])["start"]))


def test_recordings_become_segments_within_bounds(first_run: dict[str, Any], corpus: dict[str, Any]) -> None:
    summary, rows = first_run["summary"], first_run["rows"]
    assert first_run["quarantined"] == [], first_run["quarantined"]
    assert summary.clips_in == 3  # planned clips: two recordings and one short clip
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert "list/short" in ids  # a short clip stays whole, with its offset null
    short = next(r for r in rows if r["id"] == "list/short")
    assert short["audio_offset_s"] is None and short["transcript"] == "he turned sharply"
    for rec_id, rec in corpus["recordings"].items():
        segs = _segment_rows(rows, rec_id)
        assert len(segs) >= 3, (rec_id, [r["id"] for r in segs])
        total = len(rec.samples) / SR
        previous_end = 0.0
        for row in segs:
            match = ID.match(row["id"])
            assert match and match["rec"] == rec_id
            start, end = int(match["start"]) / 1000, int(match["end"]) / 1000
            assert 2.0 - 1e-3 <= end - start <= 20.0 + 1e-3
            assert previous_end <= start < end <= total + 1e-3
            previous_end = end
            assert row["audio_uri"] == str(rec.path.resolve())
            assert row["audio_offset_s"] == pytest.approx(start, abs=1e-3)
            assert row["duration_s"] == pytest.approx(end - start, abs=2e-3)


def test_each_utterance_lies_in_one_segment_and_its_words_are_the_transcript(first_run: dict[str, Any],
                                                                            corpus: dict[str, Any]) -> None:
    rows = first_run["rows"]
    for rec_id, rec in corpus["recordings"].items():
        segs = _segment_rows(rows, rec_id)
        spans = [(int(ID.match(r["id"])["start"]) / 1000, int(ID.match(r["id"])["end"]) / 1000) for r in segs]
        for u in rec.utterances:  # boundaries found: no utterance is cut, none is lost
            inside = [i for i, (a, b) in enumerate(spans) if a <= u.start_s and u.end_s <= b]
            assert len(inside) == 1, (rec_id, u, spans)
        for row, (a, b) in zip(segs, spans, strict=True):
            words = " ".join(u.text for u in rec.utterances if a <= u.start_s and u.end_s <= b)
            assert row["transcript"] == words, row["id"]
            assert row["transcript_source"] == "corpus"
            assert words.split()[0] in row["seed_description"]


def test_row_audio_is_the_recordings_slice(first_run: dict[str, Any], corpus: dict[str, Any]) -> None:
    for rec_id, rec in corpus["recordings"].items():
        for row in _segment_rows(first_run["rows"], rec_id):
            audio, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="int16")
            first = round(row["audio_offset_s"] * SR)
            assert rate == SR and len(audio) == round(row["duration_s"] * SR)
            # The recording's very samples; tasks/audio.py removes a DC offset above 1% of the peak
            # from every clip, so they may differ by one constant (rounded to 1 LSB).
            diff = audio.astype(np.int32) - rec.samples[first:first + len(audio)]
            assert np.ptp(diff) <= 1 and abs(int(np.median(diff))) < 400, row["id"]
            assert np.corrcoef(audio, rec.samples[first:first + len(audio)])[0, 1] > 0.9999, row["id"]


def test_ids_identical_on_a_second_run(first_run: dict[str, Any], corpus: dict[str, Any],
                                       tmp_path: Path) -> None:
    summary = run_generate(longform_config(corpus, tmp_path))
    rows, _ = committed(tmp_path, "longform", summary.version)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in first_run["rows"])
    first = {r["id"]: r for r in first_run["rows"]}
    assert all(r["transcript"] == first[r["id"]]["transcript"] for r in rows)


def test_segment_never_keeps_too_long(corpus: dict[str, Any], tmp_path: Path) -> None:
    """`sources[0].segment: {mode: never}` over the run's auto block: that source's recording stays
    one `too_long` quarantine row, the other source's recording is still cut."""
    config = longform_config(corpus, tmp_path, output={"root": str(tmp_path), "dataset": "longform",
                                                       "max_quarantine_ratio": 1.0})
    config = parse_config(config.model_dump(mode="json") | {"sources": [
        config.sources[0].model_dump(mode="json") | {"segment": {"mode": "never"}},
        config.sources[1].model_dump(mode="json")]})
    summary = run_generate(config)
    rows, quarantined = committed(tmp_path, "longform", summary.version)
    assert [(q["id"], q["reason_code"]) for q in quarantined] == [("talks/rec_a", "too_long")]
    assert "75." in quarantined[0]["message"] and "audio.max_duration_s=30.0" in quarantined[0]["message"]
    assert not any(r["id"].startswith("talks/") for r in rows)
    assert len(_segment_rows(rows, "list/rec_b")) >= 3 and "list/short" in {r["id"] for r in rows}


def test_a_version_written_before_audio_offset_s_still_opens_and_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards and manifest written with the row schema of before segments (no `audio_offset_s`):
    open_dataset reads them by the manifest's schema, verify passes, rows keep their values."""
    import pyarrow as pa

    from flows.generate import run_plain
    from schemas import arrow
    from storage.reader import open_dataset
    from tasks import pipeline, publish

    old_fields = [f for f in ROW_SCHEMA if f.name != "audio_offset_s"]
    old_features = arrow.hf_features(old_fields)
    old = pa.schema(old_fields, metadata={b"huggingface": json.dumps({"info": {"features": old_features}}).encode()})
    monkeypatch.setattr(pipeline, "ROW_SCHEMA", old)
    monkeypatch.setattr(pipeline, "rows_to_table", lambda rows: arrow.rows_to_table(rows)
                        .drop_columns(["audio_offset_s"]).replace_schema_metadata(old.metadata))
    monkeypatch.setattr(publish, "ROW_SCHEMA", old)
    monkeypatch.setattr(publish, "hf_features", lambda: old_features)
    manifest = (SAMPLES / "manifest.jsonl").read_text().splitlines()
    listed = tmp_path / "old.jsonl"
    listed.write_text("".join(json.dumps(json.loads(line) | {"path": str(SAMPLES / json.loads(line)["path"])}) + "\n"
                              for line in manifest[:3]))
    config = parse_config({"sources": [{"path": str(listed), "dataset": "old", "allowed_roots": [str(SAMPLES)]}],
                           "output": {"root": str(tmp_path / "root"), "dataset": "old"}, "llm": {"backend": "rules"}})
    version = run_plain(config).lineage.version
    handle = open_dataset(f"{tmp_path / 'root'}/old@{version}")
    assert "audio_offset_s" not in handle.schema.names
    assert handle.verify().ok
    table = handle.to_arrow()
    assert table.num_rows == 3 and "audio_offset_s" not in table.column_names
    assert sorted(table.column("id").to_pylist()) == sorted(f"old/{json.loads(line)['id']}" for line in manifest[:3])
    with pytest.raises(Exception, match="audio_offset_s"):  # asking for the new column names it
        handle.to_arrow(columns=["id", "audio_offset_s"])
