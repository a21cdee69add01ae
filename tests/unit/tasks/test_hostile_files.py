"""Hostile input, part A: one file, path or label can neither hang, crash nor leak a run.

Every case goes through a real run (`run_plain`) on a corpus built with the operating system's own
tools (tests/support/hostile_tree.py) and checks the exact reason and the essentials of the message, and
that nothing is lost: clips in = rows + quarantined.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from schemas.config import AudioConfig, SourceConfig, load_config
from schemas.records import Clip, QuarantineError, ReasonCode
from storage.objectstore import open_store
from tasks.audio import load_audio
from tasks.ingest import iter_refs, load_clip, source_fingerprint
from tasks.ingest.common import MAX_LINE_BYTES, clean_id
from tasks.ingest.manifest import iter_manifest_records
from tasks.plan import load_plan
from tasks.run import run_context
from tests.support.hostile_tree import (
    FLAC,
    MAX_FILE_BYTES,
    SHORT,
    SPEECH,
    RunResult,
    copy,
    hostile_folder,
    piped_flac,
    run,
    run_config,
    write_jsonl,
)


def _nothing_lost(result: RunResult) -> None:
    stats = result.manifest.stats
    assert stats.rows == len(result.rows) and stats.quarantined == len(result.quarantine)
    assert set(result.rows).isdisjoint(result.quarantine)


def _reasons(result: RunResult, dataset: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {k.removeprefix(f"{dataset}/"): None for k in result.rows}
    out |= {k.removeprefix(f"{dataset}/"): q["reason_code"] for k, q in result.quarantine.items()}
    return out


# ------------------------------------------------------------------------------------ folders


@pytest.mark.timeout(180)  # a FIFO read with a plain open() would block here forever
def test_a_folder_of_hostile_files_runs_to_the_end_and_loses_nothing(tmp_path: Path) -> None:
    tree = hostile_folder(tmp_path)
    config = run_config([{"path": str(tree.root), "dataset": "h"}], tmp_path / "out",
                        f"audio.max_file_bytes={MAX_FILE_BYTES}")
    # The fingerprint (part of the run id) stats every file: a FIFO, a dangling link or /dev/zero
    # neither blocks nor fails it.
    assert source_fingerprint(config.sources) == source_fingerprint(config.sources)
    result = run(config)
    _nothing_lost(result)
    assert _reasons(result, "h") == tree.expected
    assert result.manifest.stats.rows + result.manifest.stats.quarantined == len(tree.expected)
    for local, needles in tree.messages.items():
        message = result.quarantine[f"h/{local}"]["message"]
        for needle in needles:
            assert needle in message, (local, needle, message)
    # Stages: the walk and the path rules stop clips at ingest, the read rules at audio.
    stage = {k.removeprefix("h/"): q["stage"] for k, q in result.quarantine.items()}
    assert stage["z"] == stage["big"] == "audio"
    assert stage["zero"] == stage["gone"] == stage["outside/"] == stage["sub/back/"] == "ingest"
    # The piped FLAC is measured by decoding, not taken at its header's word.
    piped = result.rows["h/piped"]
    assert piped["duration_s"] == pytest.approx(sf.info(str(SHORT)).frames / 16000, abs=0.01)
    # A symlinked sub-folder inside the root is followed: its clip is a row under the link's name too.
    assert result.rows["h/linked/c"]["audio_sha256"] == result.rows["h/real_sub/c"]["audio_sha256"]
    assert "h/new\nline" not in result.rows and result.rows["h/new%0Aline"]["transcript"] is None
    # The plan (and the run summary) counts the folders it could not enter.
    plan = load_plan(open_store(str(tmp_path / "out")), run_context(config).staging)
    assert plan is not None and plan.unentered_folders == {"path_outside_root": 1, "unreadable": 1}
    assert plan.skipped_files == {".%ED%B3%BF": 1}
    assert plan.clips == len(tree.expected)


@pytest.mark.timeout(120)
def test_devices_fifos_and_proc_inside_the_allowed_roots_are_not_files(tmp_path: Path) -> None:
    """With /dev and /proc allowed, the read rules still refuse what is no regular file."""
    root = tmp_path / "corpus"
    copy(SPEECH, root / "ok.wav")
    os.mkfifo(root / "fifo.wav")
    os.symlink("/dev/zero", root / "zero.wav")
    os.symlink("/dev/urandom", root / "urandom.wav")
    os.symlink("/proc/self/environ", root / "environ.wav")
    os.symlink("loop.wav", root / "loop.wav")
    config = run_config([{"path": str(root), "dataset": "d", "allowed_roots": ["/dev", "/proc"]}], tmp_path / "out")
    result = run(config)
    _nothing_lost(result)
    assert _reasons(result, "d") == {"ok": None, "fifo": "not_a_file", "zero": "not_a_file",
                                     "urandom": "not_a_file", "environ": "not_a_file", "loop": "not_a_file"}
    msg = {k.removeprefix("d/"): q["message"] for k, q in result.quarantine.items()}
    # The audio stage reads (and names) the link's real path, resolved once at ingest.
    assert msg["zero"].startswith("/dev/zero: a character device, not a regular file")
    assert msg["urandom"].startswith("/dev/urandom: a character device")
    assert "a kernel pseudo-file (/proc/" in msg["environ"]
    assert "fifo.wav: a FIFO" in msg["fifo"] and "dangling symbolic link" in msg["loop"]


def test_the_read_itself_is_capped_and_checked(tmp_path: Path) -> None:
    """load_audio alone: stat first, then the descriptor; size before any byte is read."""
    os.mkfifo(tmp_path / "f.wav")
    with pytest.raises(QuarantineError) as err:
        load_audio(Clip(id="x", dataset="d", audio_uri=str(tmp_path / "f.wav")), AudioConfig())
    assert err.value.reason is ReasonCode.not_a_file
    big = copy(SPEECH, tmp_path / "big.wav")
    with pytest.raises(QuarantineError) as err:
        load_audio(Clip(id="x", dataset="d", audio_uri=str(big)), AudioConfig(max_file_bytes=1000))
    assert err.value.reason is ReasonCode.too_large and f"{big.stat().st_size:,} bytes" in err.value.message
    # Embedded bytes (Parquet, lhotse segments) obey the same cap.
    with pytest.raises(QuarantineError) as err:
        load_audio(Clip(id="x", dataset="d", audio_uri="mem", audio_bytes=big.read_bytes()),
                   AudioConfig(max_file_bytes=1000))
    assert err.value.reason is ReasonCode.too_large
    # A header without a length is measured: a piped FLAC longer than max_duration_s is too_long
    # from decoding (never from its SF_COUNT_MAX header), a shorter one decodes to its true length.
    piped = piped_flac(SPEECH, tmp_path / "p.flac")
    frames = sf.info(str(SPEECH)).frames
    assert load_audio(Clip(id="x", dataset="d", audio_uri=str(piped)), AudioConfig()).samples.shape[0] == frames
    with pytest.raises(QuarantineError) as err:
        load_audio(Clip(id="x", dataset="d", audio_uri=str(piped)), AudioConfig(max_duration_s=1.0))
    assert err.value.reason is ReasonCode.too_long and "header states no plausible length" in err.value.message
    # A header that claims far more samples than its bytes can hold (2**35 frames, 24 days, in 40 KB)
    # is not trusted either: the clip is measured, and is what it holds.
    liar = bytearray(FLAC.read_bytes())
    assert liar[:4] == b"fLaC" and liar[4] & 0x7F == 0  # STREAMINFO first: total samples in bytes 18..25
    packed = int.from_bytes(liar[18:26], "big")
    liar[18:26] = ((packed & ~((1 << 36) - 1)) | (1 << 35)).to_bytes(8, "big")
    (tmp_path / "liar.flac").write_bytes(bytes(liar))
    assert sf.info(str(tmp_path / "liar.flac")).frames == 1 << 35
    audio = load_audio(Clip(id="x", dataset="d", audio_uri=str(tmp_path / "liar.flac")), AudioConfig())
    assert audio.samples.shape[0] == sf.info(str(FLAC)).frames


# ------------------------------------------------------------------------------------ manifests


@pytest.mark.timeout(180)
def test_manifest_paths_are_confined_and_rows_cannot_fail_the_run(tmp_path: Path) -> None:
    corpus, elsewhere, secret = tmp_path / "corpus", tmp_path / "elsewhere", tmp_path / "secret"
    copy(SPEECH, corpus / "audio" / "a.wav")
    copy(SHORT, corpus / "audio" / "b.wav")
    copy(SPEECH, elsewhere / "e.wav")
    copy(SPEECH, secret / "s.wav")
    os.symlink("/dev/zero", corpus / "audio" / "zero.wav")
    deep = "../" * (len(corpus.parts) + 2) + "etc/passwd"  # enough `..` to reach / from any tmp depth
    rows: list[dict[str, object] | str] = [
        {"id": "good", "path": "audio/a.wav"},
        {"id": "passwd", "path": "../../etc/passwd"},
        {"id": "passwd_deep", "path": deep},
        {"id": "environ", "path": "/proc/self/environ"},
        {"id": "abs_out", "path": str(secret / "s.wav")},
        {"id": "abs_allowed", "path": str(elsewhere / "e.wav")},
        {"id": "nul", "path": "audio/a\u0000.wav"},
        {"id": "new\nline\ttab\x7f", "path": "audio/b.wav"},
        {"id": "huge", "path": "audio/a.wav", "transcript": "x" * (MAX_LINE_BYTES + 10)},
        {"id": "zero", "path": "audio/zero.wav"},
    ]
    manifest = write_jsonl(corpus / "m.jsonl", rows)
    cfg = tmp_path / "cfg" / "run.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump({
        "sources": [{"path": "../corpus/m.jsonl", "dataset": "m", "allowed_roots": ["../elsewhere"]}],
        "output": {"root": "../out", "dataset": "hostile", "shard_size": 4, "max_quarantine_ratio": 1.0}}))
    config = load_config(cfg, [f"output.root={tmp_path / 'out'}"], environ={})
    assert config.sources[0].allowed_roots == [str(elsewhere)]  # resolved against the config's folder
    result = run(config)
    _nothing_lost(result)
    # The over-long row is never read, so its id cannot be: it is named by its byte offset.
    huge = "row@" + str(len(b"".join(manifest.read_bytes().splitlines(keepends=True)[:8])))
    assert _reasons(result, "m") == {
        "good": None, "abs_allowed": None, "new%0Aline%09tab%7F": None,
        "passwd": "path_outside_root", "passwd_deep": "path_outside_root", "environ": "path_outside_root",
        "abs_out": "path_outside_root", "nul": "bad_row", huge: "bad_row", "zero": "path_outside_root"}
    msg = {k.removeprefix("m/"): q["message"] for k, q in result.quarantine.items()}
    msg["huge"] = msg.pop(huge)
    assert msg["passwd_deep"].startswith(f"{manifest} line 3 (byte ")
    assert "resolves to /etc/passwd, which is outside" in msg["passwd_deep"] and "sources[0].allowed_roots" in msg["passwd_deep"]
    assert f"{manifest} line 2 (byte " in msg["passwd"]
    assert "'/proc/self/environ'" in msg["environ"] and f"outside the source's root {corpus}" in msg["environ"]
    assert f"add {secret} to sources[0].allowed_roots" in msg["abs_out"]
    assert msg["nul"].startswith(f"{manifest} line 7 (byte ") and "NUL byte" in msg["nul"]
    assert msg["huge"].startswith(f"{manifest} line 9 (byte ") and "longer than the 4,194,304 bytes" in msg["huge"]
    assert "resolves to /dev/zero" in msg["zero"]
    # Nothing from outside the roots was published: the allowed file's row points where it should.
    assert result.rows["m/abs_allowed"]["audio_uri"] == str(elsewhere / "e.wav")
    assert all(not r["audio_uri"].startswith(("/etc", "/proc", str(secret))) for r in result.rows.values())


def test_a_huge_csv_line_is_one_bad_row_and_the_next_row_is_read(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    with path.open("w") as f:
        f.write("path,transcript\n")
        f.write(f"a.wav,{'y' * (MAX_LINE_BYTES + 1)}\n")
        f.write("b.wav,fine\n")
    records = list(iter_manifest_records(path))
    assert len(records) == 2
    assert isinstance(records[0][1], str) and f"{path} line 2 (byte 16)" in records[0][1]
    assert "longer than" in records[0][1]
    assert records[1][1] == {"path": "b.wav", "transcript": "fine"}


# ------------------------------------------------------------------------------------ adapters


def _cut(cut_id: str, source: str, duration: float, start: float = 0.0, length: float | None = None) -> str:
    rec = {"id": cut_id, "sources": [{"type": "file", "channels": [0], "source": source}],
           "sampling_rate": 16000, "num_samples": int(duration * 16000), "duration": duration, "channel_ids": [0]}
    return json.dumps({"id": cut_id, "start": start, "duration": length if length is not None else duration,
                       "channel": 0, "recording": rec, "supervisions": [], "type": "MonoCut"})


@pytest.mark.timeout(180)
def test_lhotse_audio_outside_the_manifest_folder_needs_allowed_roots(tmp_path: Path) -> None:
    lh = tmp_path / "lh"
    folder = lh / "manifests"
    duration = sf.info(str(SPEECH)).duration
    copy(SPEECH, lh / "audio" / "abs.wav")
    copy(SPEECH, lh / "audio" / "rel.wav")  # "audio/rel.wav": found from the manifests' parent only
    copy(SPEECH, folder / "local.wav")
    os.mkfifo(folder / "fifo.wav")
    lines = [_cut("abs", str(lh / "audio" / "abs.wav"), duration), _cut("rel", "audio/rel.wav", duration),
             _cut("local", "local.wav", duration), _cut("fifo", "fifo.wav", duration, start=0.5, length=1.0)]
    with gzip.open(folder / "cuts_x.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    config = run_config([{"kind": "lhotse", "path": str(folder), "dataset": "l"}], tmp_path / "out")
    result = run(config)
    _nothing_lost(result)
    assert _reasons(result, "l") == {"local": None, "abs": "path_outside_root", "rel": "path_outside_root",
                                     "fifo": "not_a_file"}
    msg = {k.removeprefix("l/"): q["message"] for k, q in result.quarantine.items()}
    for cut in ("abs", "rel"):
        assert f"add {lh / 'audio'} to sources[0].allowed_roots" in msg[cut]
        assert "lhotse manifests keep the audio paths of the machine that prepared them" in msg[cut]
    assert "cuts_x.jsonl.gz at byte" in msg["rel"] and "a FIFO (named pipe)" in msg["fifo"]
    # Allowed: both become clips that decode.
    allowed = [SourceConfig(kind="lhotse", path=str(folder), dataset="l", allowed_roots=[str(lh / "audio")])]
    clips = {r.id: load_clip(r, allowed) for r in iter_refs(allowed)}
    for cut in ("l/abs", "l/rel"):
        assert clips[cut].ingest_error is None
        assert load_audio(clips[cut], AudioConfig()).duration_s == pytest.approx(duration, abs=0.01)


@pytest.mark.timeout(180)
def test_commonvoice_and_parquet_rows_cannot_point_outside(tmp_path: Path) -> None:
    cv = tmp_path / "cv" / "en"
    copy(SHORT, cv / "clips" / "good.wav")
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccent\tlocale\tsegment\n"
    deep = "../" * (len(cv.parts) + 3) + "etc/passwd"
    (cv / "validated.tsv").write_text(header + "c1\tgood.wav\thello\t2\t0\t\t\t\ten\t\n"
                                      f"c2\t{deep}\tsecret\t2\t0\t\t\t\ten\t\n")
    hf = tmp_path / "hf"
    hf.mkdir()
    audio = pa.array([{"bytes": SHORT.read_bytes(), "path": "x.wav"}, {"bytes": None, "path": "/etc/passwd"},
                      {"bytes": None, "path": "../" * 12 + "etc/hostname"}],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"id": ["ok", "abs", "up"], "audio": audio}), hf / "train.parquet")
    (hf / "sub").mkdir()
    os.symlink("..", hf / "sub" / "loop")  # pyarrow's recursive listing would follow this until ELOOP
    os.mkfifo(hf / "pipe.parquet")  # opening it to read a Parquet footer would block
    config = run_config([{"kind": "commonvoice", "path": str(cv), "dataset": "cv"},
                         {"kind": "hf_parquet", "path": str(hf), "dataset": "hf"}], tmp_path / "out")
    result = run(config)
    _nothing_lost(result)
    got = {k: (result.quarantine[k]["reason_code"] if k in result.quarantine else None)
           for k in [*result.rows, *result.quarantine]}
    assert got == {"cv/good": None, "hf/ok": None, "cv/passwd": "path_outside_root",
                   "hf/abs": "path_outside_root", "hf/up": "path_outside_root",
                   "hf/sub/loop/": "unreadable", "hf/pipe": "not_a_file"}
    assert "a symbolic-link loop" in result.quarantine["hf/sub/loop/"]["message"]
    assert "pipe.parquet: not a regular file" in result.quarantine["hf/pipe"]["message"]
    assert "sources[0].allowed_roots" in result.quarantine["cv/passwd"]["message"]
    assert "validated.tsv at byte" in result.quarantine["cv/passwd"]["message"]
    assert "sources[1].allowed_roots" in result.quarantine["hf/abs"]["message"]
    assert "train.parquet#row=2" in result.quarantine["hf/up"]["message"]


# ------------------------------------------------------------------------------------ ids


def test_clip_ids_have_no_control_characters_and_stay_distinct() -> None:
    assert clean_id("ds/new\nline") == "ds/new%0Aline"
    assert clean_id("a\x00b\tc\x7fd\x85e\u2028f") == "a%00b%09c%7Fd%C2%85e%E2%80%A8f"
    assert clean_id("plain/id-1 x") == "plain/id-1 x" and clean_id("100% sure %zz") == "100% sure %zz"
    assert clean_id("a%0Ab") == "a%250Ab" != clean_id("a\nb")  # an escape-looking name stays distinct
    assert clean_id("ünïcode/语音") == "ünïcode/语音"
    assert clean_id(os.fsdecode(b"bad\xff")) == "bad%ED%B3%BF"  # a non-UTF-8 file name's byte
    rng = random.Random(16)
    alphabet = ["a", "%", "0", "A", "\n", "\x00", "\t", "\x85", "/", "é", "\udcff", "\u2028"]
    seen: dict[str, str] = {}
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        out = clean_id(text)
        assert out == clean_id(text)  # stable
        assert not {unicodedata.category(c) for c in out} & {"Cc", "Cs", "Zl", "Zp"}
        out.encode("utf-8")  # writable to Parquet and JSON
        assert seen.setdefault(out, text) == text, (out, text, seen[out])  # injective


def test_folder_and_manifest_ids_are_clean(tmp_path: Path) -> None:
    root = tmp_path / "c"
    copy(SHORT, root / "tab\there.wav")
    copy(SHORT, root / "del\x7f.flac")
    write_jsonl(root / "list.jsonl", [{"path": "tab\there.wav", "id": "line\nbreak"}, {"path": "del\x7f.flac"}])
    folder_ids = sorted(r.id for r in iter_refs([SourceConfig(path=str(root), dataset="f")]))
    assert folder_ids == ["f/del%7F", "f/tab%09here"]
    manifest_ids = sorted(r.id for r in iter_refs([SourceConfig(path=str(root / "list.jsonl"), dataset="m")]))
    assert manifest_ids == ["m/del%7F", "m/line%0Abreak"]
    # The id is escaped, the path is not: the clip still reads its own file.
    source = [SourceConfig(path=str(root), dataset="f")]
    tab = next(load_clip(r, source) for r in iter_refs(source) if r.id == "f/tab%09here")
    assert tab.audio_uri == str(root / "tab\there.wav")
    assert load_audio(tab, AudioConfig()).samples.shape[0] == sf.info(str(SHORT)).frames
