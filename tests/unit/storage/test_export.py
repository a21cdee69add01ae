"""`speechpairs datasets export desta|desta2`: values against the version's rows, resume after a
kill -9, and a row that cannot be exported (named by clip id and shard, exit 1).

Versions come from the real stages on the 10-clip sample corpus (tests/support/datasets_support.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from flows.cli import main
from storage.export import ExportError, export_desta2
from storage.objectstore import LocalStore
from storage.versions import file_key, read_manifest
from tests.support.datasets_support import make_version
from tests.support.paths import REPO
from tests.support.stored import stored_rows

DS = "demo"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local root with demo v0001 (10 rows, 3 shards). Read-only: copy it to change it."""
    work = tmp_path_factory.mktemp("export")
    make_version(str(work / "root"), DS, workdir=work)
    return work / "root"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["datasets", "export", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def version_rows(root: Path) -> dict[str, dict[str, Any]]:
    """The version's rows read with plain pyarrow, audio bytes from the audio files by id (the oracle)."""
    manifest = read_manifest(LocalStore(root), DS, "v0001")
    # What the pipeline writes now: audio stored once, outside the row shards (their bytes are null).
    assert manifest.shards and all(s.audio is not None for s in manifest.shards)
    return stored_rows(LocalStore(root), manifest)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


def test_desta2_lines_match_the_version(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    rc, out, err = cli(capsys, "desta2", f"{root}/{DS}@v0001", str(dest), "--no-progress")
    rows = version_rows(root)
    total = sum(len(r["audio"]["bytes"]) for r in rows.values())
    assert rc == 0 and err == ""
    assert f"10 rows in {DS}.desta2.jsonl" in out and f"({total:,} bytes; 10 written, 0 already there" in out
    lines = read_jsonl(dest / f"{DS}.desta2.jsonl")
    assert [ln["id"] for ln in lines] == list(rows)  # manifest order, every row once
    for ln in lines:
        row = rows[ln["id"]]
        assert set(ln) == {"audio_filepath", "duration", "transcription", "input", "target", "id", "dataset"}
        assert ln["audio_filepath"] == f"audio/{row['id']}.flac"
        assert (ln["transcription"], ln["input"], ln["target"], ln["dataset"]) == (
            row["transcript"] or "", row["prompt"], row["response"], row["dataset"])
        assert ln["duration"] == pytest.approx(row["duration_s"], abs=1e-3)
        # The file is exactly the row's stored clip, never the source file it came from.
        assert (dest / ln["audio_filepath"]).read_bytes() == row["audio"]["bytes"]
        assert sf.info(dest / ln["audio_filepath"]).duration == pytest.approx(ln["duration"], abs=1e-6)
    assert any(ln["transcription"] for ln in lines) and any(not ln["transcription"] for ln in lines)


def test_both_formats_share_dest_and_a_rerun_rewrites_nothing(root: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "shared"
    assert cli(capsys, "desta", f"{root}/{DS}@v0001", str(dest), "--no-progress")[0] == 0
    rc, out, _ = cli(capsys, "desta2", f"{root}/{DS}", str(dest), "--no-progress", "--jsonl", "train.jsonl")
    assert rc == 0 and "0 written, 10 already there and verified" in out
    desta = read_jsonl(dest / f"{DS}.jsonl")
    desta2 = read_jsonl(dest / "train.jsonl")
    assert [ln["id"] for ln in desta] == [ln["audio_filepath"] for ln in desta2]  # same clip, same file
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(
        [f"{DS}.jsonl", "train.jsonl", *(ln["id"] for ln in desta)])


def test_progress_bar_goes_to_stderr(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "desta", f"{root}/{DS}@v0001", str(tmp_path / "p"), "--progress")
    assert rc == 0 and "10/10" in err and "row" in err and "10/10" not in out


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import storage.export.core as core
    from flows.cli import main

    real, written = core.write_audio, []

    def write_then_die(target, data):
        changed = real(target, data)
        written.append(target)
        if len(written) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # no finally, no cleanup: a real crash
        return changed

    core.write_audio = write_then_die
    sys.exit(main(["datasets", "export", sys.argv[4], sys.argv[1], sys.argv[2], "--no-progress"]))
""")


@pytest.mark.parametrize("fmt", ["desta", "desta2"])
def test_export_resumes_after_kill_9(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    dest, fresh = tmp_path / "killed", tmp_path / "fresh"
    jsonl = f"{DS}.jsonl" if fmt == "desta" else f"{DS}.desta2.jsonl"
    proc = subprocess.run([sys.executable, "-c", _KILLER, f"{root}/{DS}@v0001", str(dest), "5", fmt],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not (dest / jsonl).exists()  # only a complete JSONL gets its name
    audio = sorted(p for p in (dest / "audio").rglob("*") if p.is_file())
    assert len(audio) == 5
    # A file cut short (no fsync before the crash) and a stray temporary file from a write in flight.
    audio[0].write_bytes(audio[0].read_bytes()[:1000])
    audio[1].with_name(audio[1].name + ".part").write_bytes(b"half")
    untouched = {p: p.stat().st_mtime_ns for p in audio[2:]}

    rc, out, _ = cli(capsys, fmt, f"{root}/{DS}@v0001", str(dest), "--no-progress")
    assert rc == 0 and "10 rows" in out and "6 written, 4 already there and verified" in out
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # verified files are not rewritten
    assert cli(capsys, fmt, f"{root}/{DS}@v0001", str(fresh), "--no-progress")[0] == 0
    assert (dest / jsonl).read_bytes() == (fresh / jsonl).read_bytes()  # complete, as if never interrupted
    rows = version_rows(root)
    for ln in read_jsonl(dest / jsonl):
        rel = ln["id"] if fmt == "desta" else ln["audio_filepath"]
        clip = ln["clip_id"] if fmt == "desta" else ln["id"]
        assert (dest / rel).read_bytes() == rows[clip]["audio"]["bytes"]
    assert not list(dest.rglob("*.part"))  # the stray temporary file is gone too


def _rewrite_row_audio(shard: Path, index: int, audio: dict[str, Any] | None) -> str:
    """Replace one row's audio struct in a shard file (keeping its schema); returns that row's id."""
    table = pq.read_table(shard)
    values = table.column("audio").to_pylist()
    values[index] = audio
    i = table.schema.get_field_index("audio")
    table = table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))
    pq.write_table(table, shard)
    return str(table.column("id")[index].as_py())


def test_a_row_that_cannot_be_exported_is_named(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    manifest = read_manifest(LocalStore(copy), DS, "v0001")
    shard = file_key(manifest, manifest.shards[1])
    bad = _rewrite_row_audio(copy / shard, 2, {"bytes": b"this is not audio", "path": "x.flac"})

    dest = tmp_path / "out"
    rc, out, err = cli(capsys, "desta2", f"{copy}/{DS}@v0001", str(dest), "--no-progress")
    assert rc == 1 and out == ""
    assert f"row {bad!r} in shard {shard}" in err and "not readable" in err
    assert not (dest / f"{DS}.desta2.jsonl").exists() and not list(dest.glob("*.part"))
    with pytest.raises(ExportError, match=f"row '{bad}' in shard {shard}"):
        export_desta2(LocalStore(copy), DS, "v0001", dest)

    # The shard's audio file lacks a clip the shard lists (its bytes are null in the shard).
    missing = str(pq.read_table(copy / shard, columns=["id"]).column("id")[0].as_py())
    assert manifest.shards[1].audio is not None
    audio_file = copy / file_key(manifest, manifest.shards[1].audio)
    table = pq.read_table(audio_file)
    pq.write_table(table.filter(pc.not_equal(table.column("id"), missing)), audio_file)
    rc, _, err = cli(capsys, "desta", f"{copy}/{DS}@v0001", str(dest), "--no-progress")
    assert rc == 1 and f"shard {shard}" in err and f"has no clip {missing!r}" in err
    assert not (dest / f"{DS}.jsonl").exists()

    # A row with neither bytes of its own nor in the audio file: named by clip id and shard.
    first = manifest.shards[0]
    assert first.audio is not None
    gone = _rewrite_row_audio(copy / file_key(manifest, first), 0, {"bytes": None, "path": "x.flac"})
    audio_file = copy / file_key(manifest, first.audio)
    table = pq.read_table(audio_file)
    values = [None if i == gone else a for i, a in zip(table.column("id").to_pylist(),
                                                         table.column("audio").to_pylist(), strict=True)]
    j = table.schema.get_field_index("audio")
    pq.write_table(table.set_column(j, table.schema.field(j), pa.array(values, type=table.schema.field(j).type)),
                   audio_file)
    rc, _, err = cli(capsys, "desta", f"{copy}/{DS}@v0001", str(dest), "--no-progress")
    assert rc == 1 and f"row {gone!r} in shard {first.path}" in err and "no stored audio bytes" in err
