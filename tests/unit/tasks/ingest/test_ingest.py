import json
from pathlib import Path

import pytest

from schemas.config import SourceConfig
from schemas.records import ReasonCode
from tasks.ingest import SourceError, dataset_name, iter_refs, load_clip
from tests.support.corrupt_zoo import mixed_folder


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
    clips = _clips([SourceConfig(path=str(tmp_path / "m.jsonl"), dataset="c", labels={"corpus": "test"},
                                 allowed_roots=["/abs"])])  # absolute paths outside the manifest's folder
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


# --------------------------------------------------------------------------- encodings and line numbers

def _manifest_bytes(fmt: str, rows: list[tuple[str, str] | None]) -> bytes:
    """A manifest of (path, transcript) rows (None: a blank line), transcripts encoded as Latin-1."""
    sep = b"," if fmt == "csv" else b"\t"
    out = b"" if fmt == "jsonl" else sep.join([b"path", b"transcript"]) + b"\n"
    for row in rows:
        if row is None:
            out += b"\n"
        elif fmt == "jsonl":
            out += b'{"path": "' + row[0].encode() + b'", "transcript": "' + row[1].encode("latin-1") + b'"}\n'
        else:
            out += row[0].encode() + sep + row[1].encode("latin-1") + b"\n"
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_a_latin1_byte_spoils_only_its_row_naming_file_and_line(tmp_path: Path, fmt: str) -> None:
    """Before: one Latin-1 byte aborted the whole run with UnicodeDecodeError."""
    from tasks.ingest.manifest import iter_manifest_records

    path = tmp_path / f"m.{fmt}"
    data = _manifest_bytes(fmt, [("a.wav", "hello"), None, ("b.wav", "un caf\xe9 noir"), ("c.wav", "bye")])
    path.write_bytes(data)
    bad_offset = data.index(b"b.wav") - (len(b'{"path": "') if fmt == "jsonl" else 0)
    bad_line = 3 if fmt == "jsonl" else 4  # a blank line before it; CSV/TSV: the header is line 1
    column = data.index(b"\xe9") - bad_offset + 1
    want = f"{path} line {bad_line} (byte {bad_offset}): not valid UTF-8 (byte 0xe9 at column {column})"

    walked = dict(iter_manifest_records(path))  # the planning walk
    assert isinstance(walked[bad_offset], str) and walked[bad_offset].startswith(want), walked[bad_offset]
    clips = _clips([SourceConfig(path=str(path), dataset="d")])  # read_record_at, per row
    assert [c.id for c in clips] == ["d/a", f"d/row@{bad_offset}", "d/c"]
    assert [c.transcript for c in clips if c.ingest_error is None] == ["hello", "bye"]
    bad = clips[1].ingest_error
    assert bad is not None and bad[0] == ReasonCode.bad_row
    assert bad[1].startswith(want) and "save the manifest as UTF-8" in bad[1]
    assert "codec can't decode" not in bad[1]


def test_line_numbers_count_physical_lines_of_multiline_csv_fields(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    data = b'path,transcript\nx.wav,"two\nlines"\ny.wav,too,many\n'
    path.write_bytes(data)
    clips = _clips([SourceConfig(path=str(path), dataset="d")])
    assert clips[0].transcript == "two lines"
    assert clips[1].ingest_error is not None
    offset = data.index(b"y.wav")
    assert clips[1].ingest_error[1].startswith(f"{path} line 4 (byte {offset}): row has 3 fields, header has 2")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_bom_and_crlf_give_clean_column_names_and_values(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"m.{fmt}"
    if fmt == "jsonl":
        path.write_bytes(b'\xef\xbb\xbf{"path": "a.wav", "transcript": "hello", "note": "one\\ntwo"}\r\n'
                         b'{"path": "b.wav", "transcript": "bye", "note": "plain"}\r\n')
    else:
        sep = b"," if fmt == "csv" else b"\t"
        path.write_bytes(b"\xef\xbb\xbf" + sep.join([b"path", b"transcript", b"note"]) + b"\r\n"
                         + sep.join([b"a.wav", b"hello", b'"one\r\ntwo"']) + b"\r\n"
                         + sep.join([b"b.wav", b"bye", b"plain"]) + b"\r\n")
    clips = _clips([SourceConfig(path=str(path), dataset="d")])
    assert [c.ingest_error for c in clips] == [None, None]  # `path` found: the BOM is not in its name
    assert [c.audio_uri for c in clips] == [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    assert [c.transcript for c in clips] == ["hello", "bye"]
    assert [c.labels for c in clips] == [{"note": "one\ntwo"}, {"note": "plain"}]
    assert [c.id for c in clips] == ["d/a", "d/b"]


def test_a_header_that_is_not_utf8_fails_the_source_up_front(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"path,transcripci\xf3n\nx.wav,hola\n")
    with pytest.raises(SourceError, match=r"m\.csv line 1 \(the header\): not valid UTF-8 \(byte 0xf3"):
        list(iter_refs([SourceConfig(path=str(path), dataset="d")]))


# --------------------------------------------------------------------------- folders: what is not audio


def test_plan_counts_skipped_non_audio_files_by_extension(tmp_path: Path, sample_corpus: Path) -> None:
    from schemas.config import parse_config
    from storage.objectstore import open_store
    from tasks.plan import load_plan, plan_run, skipped_text

    folder = mixed_folder(tmp_path / "corpus", sample_corpus)
    (folder / "README").write_text("no extension")
    config = parse_config({"sources": [{"path": str(folder), "dataset": "mixed"}],
                           "output": {"root": str(tmp_path / "out"), "dataset": "mixed"}}, environ={})
    store = open_store(str(tmp_path / "out"))
    plan = plan_run(config, store, "mixed/_staging/r1", "r1")
    assert plan.clips == 2  # a.wav and b.M4A
    assert plan.skipped_files == {".pdf": 2, "(no extension)": 1, ".docx": 1}
    assert skipped_text(plan.skipped_files) == "4 (.pdf=2, (no extension)=1, .docx=1)"
    reloaded = load_plan(store, "mixed/_staging/r1")
    assert reloaded is not None and reloaded.skipped_files == plan.skipped_files  # a resumed run reports them too
    assert [c.id for c in _clips(config.sources)] == ["mixed/spk/a", "mixed/spk/b"]
