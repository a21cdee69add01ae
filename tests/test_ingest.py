import json
import tracemalloc
from pathlib import Path

import pytest

from schemas.config import SourceConfig
from schemas.records import ReasonCode
from tasks.ingest import SourceError, dataset_name, iter_refs, load_clip


def _clips(sources: list[SourceConfig]):
    return [load_clip(ref, sources) for ref in iter_refs(sources)]


def test_jsonl_manifest_columns_labels_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    rows = [
        {"path": "a/one.wav", "id": "u1", "transcript": "hello  there", "gender": "F", "age": 23},
        {"audio": "two.flac", "text": "second"},
        {"audio_filepath": "/abs/three.wav", "speaker": "s3"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    clips = _clips([SourceConfig(path=str(tmp_path / "m.jsonl"), dataset="c", labels={"corpus": "test"})])
    assert [c.id for c in clips] == ["c/u1", "c/two", "c//abs/three"]
    assert clips[0].audio_uri == str((tmp_path / "a" / "one.wav").resolve())
    assert clips[0].transcript == "hello there"
    assert clips[0].labels == {"corpus": "test", "gender": "F", "age": "23"}
    assert clips[1].transcript == "second" and "text" not in clips[1].labels
    assert clips[2].audio_uri == "/abs/three.wav" and clips[2].labels["speaker"] == "s3"


@pytest.mark.parametrize("delim,suffix", [(",", "csv"), ("\t", "tsv")])
def test_csv_and_tsv_with_quoted_multiline_field(tmp_path: Path, delim: str, suffix: str) -> None:
    text = delim.join(["path", "transcript", "emotion"]) + "\n"
    text += delim.join(["x.wav", '"line one\nline two"', "happy"]) + "\n"
    text += delim.join(["y.wav", "plain", "sad"]) + "\n"
    (tmp_path / f"m.{suffix}").write_text(text)
    clips = _clips([SourceConfig(path=str(tmp_path / f"m.{suffix}"), dataset="d")])
    assert [c.transcript for c in clips] == ["line one line two", "plain"]
    assert [c.labels["emotion"] for c in clips] == ["happy", "sad"]


def test_bad_rows_become_ingest_errors_naming_the_file_and_fix(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"transcript": "no path"}\nnot json\n[1, 2]\n')
    clips = _clips([SourceConfig(path=str(tmp_path / "m.jsonl"), dataset="d")])
    assert len(clips) == 3
    assert all(c.ingest_error and c.ingest_error[0] == ReasonCode.bad_row for c in clips)
    assert "add a `path` column" in clips[0].ingest_error[1]
    assert "m.jsonl line 2 (byte 26): not valid JSON" in clips[1].ingest_error[1]
    assert "m.jsonl line 3 (byte 35): each line must be a JSON object, got list" in clips[2].ingest_error[1]


def test_folder_with_sidecars_sorted_and_stable(tmp_path: Path) -> None:
    for rel in ["spk2/b.flac", "spk1/a.wav", "spk1/c.mp3", "spk1/notes.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "spk1" / "a.txt").write_text("hello world\n")
    (tmp_path / "spk2" / "b.lab").write_text("from a lab file")
    source = SourceConfig(path=str(tmp_path), dataset="f")
    clips = _clips([source])
    assert [c.id for c in clips] == ["f/spk1/a", "f/spk1/c", "f/spk2/b"]
    assert [c.transcript for c in clips] == ["hello world", None, "from a lab file"]
    assert [c.id for c in _clips([source])] == [c.id for c in clips]


def test_missing_source_fails_up_front(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or directory"):
        list(iter_refs([SourceConfig(path=str(tmp_path / "nope.jsonl"))]))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(SourceError, match="not a folder and not a manifest"):
        list(iter_refs([SourceConfig(path=str(tmp_path / "x.parquet"))]))


def test_dataset_name_defaults() -> None:
    assert dataset_name(SourceConfig(path="/corpora/vctk/manifest.jsonl")) == "vctk"
    assert dataset_name(SourceConfig(path="/corpora/train_clean.csv")) == "train_clean"


def test_manifest_is_read_lazily(tmp_path: Path) -> None:
    """200k rows: iterating refs keeps memory flat (one row at a time), independent of file size."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(200_000):
            f.write(json.dumps({"path": f"clips/{i:07d}.wav", "transcript": "word " * 20, "spk": str(i % 50)}) + "\n")
    small = tmp_path / "small.jsonl"
    small.write_text(path.read_text().split("\n", 100)[0] + "\n")
    assert len(list(iter_refs([SourceConfig(path=str(small), dataset="big")]))) == 1  # warm caches first
    refs = iter_refs([SourceConfig(path=str(path), dataset="big")])
    tracemalloc.start()
    count = 0
    for _ in refs:
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 200_000
    assert peak < 1_000_000, f"peak {peak} bytes while streaming a {path.stat().st_size} byte manifest"
