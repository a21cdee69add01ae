"""Hostile corpora for tests/unit/tasks/test_hostile_files.py: FIFOs, device links, dangling and looping links,
links out of the corpus, a piped FLAC (no length in its header), odd file names, over-long rows.

Every audio file is real speech from examples/sample_corpus; the hostile parts are made with the
operating system's own tools (os.mkfifo, os.symlink) and sox, never faked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import soundfile as sf

from flows.generate import run_plain
from schemas.config import RunConfig, parse_config
from schemas.manifest import Manifest
from storage.versions import file_key
from tests.support.paths import REPO

SAMPLE_AUDIO = REPO / "examples" / "sample_corpus" / "audio"
SPEECH = SAMPLE_AUDIO / "arctic_slt_a0009.wav"  # 99 KB
SHORT = SAMPLE_AUDIO / "cmu_cards_002.wav"  # 63 KB, 31364 frames at 16 kHz
FLAC = SAMPLE_AUDIO / "cmu_goforward.flac"  # 41 KB
BIG = SAMPLE_AUDIO / "librivox_ss01_0870.wav"  # 227 KB: above the folder test's max_file_bytes
MAX_FILE_BYTES = 150_000


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def piped_flac(src: Path, dst: Path) -> Path:
    """`src` as a FLAC written through a pipe: its STREAMINFO holds no sample count, so libsndfile
    reports SF_COUNT_MAX frames (the audit's "209146758205323.72 s")."""
    info = sf.info(str(src))
    raw = subprocess.run(["sox", str(src), "-t", "raw", "-e", "signed", "-b", "16", "-"],
                         capture_output=True, check=True).stdout
    flac = subprocess.run(["sox", "-t", "raw", "-r", str(info.samplerate), "-e", "signed", "-b", "16",
                           "-c", str(info.channels), "-", "-t", "flac", "-"],
                          input=raw, capture_output=True, check=True).stdout
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(flac)
    assert sf.info(str(dst)).frames == 2**63 - 1  # the header really has no length
    return dst


@dataclass
class Tree:
    root: Path
    expected: dict[str, str | None]  # local id (after the dataset) -> reason, None for a row
    messages: dict[str, list[str]] = field(default_factory=dict)  # local id -> text its message must hold


def hostile_folder(tmp: Path) -> Tree:
    """A folder corpus mixing good clips with every file a walk or a read must survive."""
    root, elsewhere = tmp / "corpus", tmp / "elsewhere"
    copy(SPEECH, root / "a.wav")
    copy(SHORT, root / "sub" / "b.wav")
    copy(FLAC, root / "real_sub" / "c.flac")
    copy(SHORT, root / "new\nline.wav")
    copy(SHORT, root / os.fsdecode(b"latin\xe9.wav"))  # a Latin-1 name: not UTF-8
    (root / os.fsdecode(b"notes.\xff")).write_text("not audio")  # skipped, counted by a non-UTF-8 extension
    copy(BIG, root / "big.wav")
    piped_flac(SHORT, root / "piped.flac")
    copy(SPEECH, elsewhere / "e.wav")
    os.mkfifo(root / "z.wav")
    os.symlink("/dev/zero", root / "zero.wav")
    os.symlink("/dev/urandom", root / "urandom.wav")
    os.symlink("missing.wav", root / "gone.wav")
    os.symlink(root / "real_sub", root / "linked")  # inside the root: followed
    os.symlink(elsewhere, root / "outside")  # a folder outside the root: reported, not entered
    os.symlink(elsewhere / "e.wav", root / "outfile.wav")  # a file outside the root
    os.symlink("..", root / "sub" / "back")  # a loop back to the root
    expected: dict[str, str | None] = {
        "a": None, "sub/b": None, "real_sub/c": None, "linked/c": None, "new%0Aline": None, "piped": None,
        "z": "not_a_file", "zero": "path_outside_root", "urandom": "path_outside_root", "gone": "not_a_file",
        "big": "too_large", "outfile": "path_outside_root", "outside/": "path_outside_root",
        "sub/back/": "unreadable", "latin%ED%B3%A9": "unreadable",
    }
    messages = {
        "z": ["z.wav", "a FIFO (named pipe), not a regular file"],
        "zero": ["zero.wav: resolves to /dev/zero, which is outside the source's root",
                 "add /dev to sources[0].allowed_roots"],
        "urandom": ["/dev/urandom", "sources[0].allowed_roots"],
        "gone": ["gone.wav: a dangling symbolic link (to 'missing.wav'"],
        "big": ["big.wav", "bytes > audio.max_file_bytes=150,000", "not read"],
        "outfile": [f"resolves to {elsewhere / 'e.wav'}", f"add {elsewhere} to sources[0].allowed_roots"],
        "outside/": [f"a link to the folder {elsewhere}, outside the source's root",
                     f"add {elsewhere} to sources[0].allowed_roots"],
        "sub/back/": ["a symbolic-link loop", "not followed"],
        "latin%ED%B3%A9": ["latin\\xe9.wav: the file name is not valid UTF-8", "rename it"],
    }
    return Tree(root, expected, messages)


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def run_config(sources: list[dict[str, Any]], out: Path, *overrides: str) -> RunConfig:
    """A real run's config; most of these corpora are mostly bad, so the quarantine ratio is 1."""
    return parse_config({"sources": sources, "output": {"root": str(out), "dataset": "hostile", "shard_size": 4,
                                                        "max_quarantine_ratio": 1.0}},
                        list(overrides), environ={})


@dataclass
class RunResult:
    manifest: Manifest
    rows: dict[str, dict[str, Any]]  # id -> row
    quarantine: dict[str, dict[str, Any]]  # id -> quarantine row


def run(config: RunConfig) -> RunResult:
    """`run_plain` and the committed version's rows and quarantine rows, by id."""
    manifest = run_plain(config)
    base = Path(config.output.root)
    rows = [r for s in manifest.shards for r in pq.read_table(base / file_key(manifest, s)).to_pylist()]
    quarantine = [r for s in manifest.quarantine for r in pq.read_table(base / file_key(manifest, s)).to_pylist()]
    return RunResult(manifest, {r["id"]: r for r in rows}, {q["id"]: q for q in quarantine})
