"""kill -9 in the middle of a run that cuts long recordings, then resume: 0 duplicate and 0 missing
segment ids, the same ids as an uninterrupted run, and shards finished before the kill not redone.

The recordings are built here from real sample clips (examples/sample_corpus) with known silences
between them; the run is the real CLI (`python -m flows.cli run`) in its own session, killed with
SIGKILL once its first shard's completion marker exists (the next shard is then mid-way).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
import yaml

from flows.generate import run_generate
from schemas.config import parse_config
from storage.objectstore import open_store
from storage.versions import file_key, read_manifest
from tests.support.paths import REPO
from tests.support.speech import trim_quiet

SAMPLES = REPO / "examples" / "sample_corpus"
SR = 16_000
RUN_TIMEOUT_S = 300

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _utterances() -> list[np.ndarray]:
    out = []
    for path in sorted((SAMPLES / "audio").iterdir()):
        if path.suffix in {".wav", ".flac"}:
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
            mono = audio.mean(axis=1, dtype=np.float32)
            out.append(trim_quiet(soxr.resample(mono, rate, SR).astype(np.float32) if rate != SR else mono))
    return out


def build_recording(path: Path, utterances: list[np.ndarray], seed: int, seconds: float) -> None:
    """Sample utterances in a seeded order with seeded silences of 0.8-1.6 s; 16-bit WAV."""
    rng = np.random.default_rng(seed)
    parts, t = [np.zeros(SR // 2, np.float32)], SR // 2
    while t < seconds * SR:
        utt = utterances[int(rng.integers(len(utterances)))]
        gap = np.zeros(int(rng.uniform(0.8, 1.6) * SR), np.float32)
        parts += [utt, gap]
        t += len(utt) + len(gap)
    sf.write(path, np.concatenate(parts), SR, subtype="PCM_16")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("longform-resume") / "talks"
    folder.mkdir()
    utterances = _utterances()
    for i in range(4):
        build_recording(folder / f"talk_{i}.wav", utterances, seed=10 + i, seconds=50)
    return folder


def config_data(corpus: Path, out: Path) -> dict[str, Any]:
    return {"sources": [{"path": str(corpus), "dataset": "talks", "language": "en"}],
            "output": {"root": str(out), "dataset": "talks", "shard_size": 1},
            "segment": {"mode": "always", "min_s": 2.0, "max_s": 15.0, "vad": "energy", "min_silence_s": 0.3},
            "llm": {"backend": "rules"}, "runner": "sequential"}


def committed_ids(out: Path, version: str) -> list[str]:
    manifest = read_manifest(open_store(str(out)), "talks", version)
    ids: list[str] = []
    for shard in manifest.shards:
        ids += pq.read_table(out / file_key(manifest, shard), columns=["id"]).column("id").to_pylist()
    return ids


def markers(out: Path) -> dict[str, bytes]:
    """The run's completion markers so far ({} while a folder on the way is created or removed: the
    preflight probe's empty `_staging/` comes and goes under a running glob)."""
    try:
        return {p.name: p.read_bytes() for p in out.glob("talks/_staging/*/markers/shard-*.json")}
    except FileNotFoundError:
        return {}


@pytest.fixture(scope="module")
def cli_env(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("longform-env")
    (home / "tmp").mkdir()
    env = dict(os.environ)
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(home / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               TMPDIR=str(home / "tmp"), PYTHONUNBUFFERED="1")
    return env


def test_kill_9_mid_run_then_resume_gives_every_segment_once(corpus: Path, cli_env: dict[str, str],
                                                             tmp_path: Path) -> None:
    reference = run_generate(parse_config(config_data(corpus, tmp_path / "reference")))
    expected = committed_ids(tmp_path / "reference", reference.version)
    assert reference.clips_in == 4 and len(expected) >= 4 * 3  # every recording became several segments

    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_data(corpus, out)))
    logs = tmp_path / "killed"
    with logs.with_suffix(".out").open("wb") as fo, logs.with_suffix(".err").open("wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"], cwd=REPO,
                                env=cli_env, stdout=fo, stderr=fe, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not markers(out):
        assert proc.poll() is None, f"the run ended before its first marker\n{logs.with_suffix('.err').read_text()}"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    at_kill = markers(out)
    assert 1 <= len(at_kill) < 4  # killed mid-run: some shards finished, not all
    assert not list(out.glob("talks/v*/manifest.json"))

    resumed = run_generate(parse_config(config_data(corpus, out)))
    ids = committed_ids(out, resumed.version)
    assert len(ids) == len(set(ids)), "duplicate segment ids after resume"
    assert sorted(ids) == sorted(expected), "missing or extra segment ids after resume"
    assert resumed.shards_skipped >= len(at_kill)
    after = markers(out)
    assert all(after[name] == body for name, body in at_kill.items())  # finished shards were not redone
    outcome = json.loads(next(iter(after.values())))
    assert outcome["recordings_cut"] == 1 and outcome["segments"] >= 3
    assert outcome["rows"] + outcome["quarantined"] == outcome["segments"]
