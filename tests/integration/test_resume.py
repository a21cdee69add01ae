"""Resume after `kill -9`: the same config resumes its staging area and commits one version, with
no duplicate and no missing id, and shards finished before the kill are not redone.

Every run is the real `speechpairs run CONFIG` in a subprocess (its own process group) against the
session Prefect server, with `llm.backend: openai` pointed at tests/support/fake_llm_server.py (which counts
the requests per clip: each clip's transcript carries a `clip=<id>` marker).

- mid-run: SIGKILL to the process group at a random moment (after 2…6 of 9 shards, + 0…0.3 s);
- commit: SIGKILL once every shard is finished, at each named point of the commit protocol (before
  the claim, after the claim, after the manifest, after the ref), deterministically:
  tests/support/resume_support.py makes the process SIGKILL itself there, since these windows are a few
  milliseconds wide and polling from outside would hit them only by luck;
- after success: the same config again commits nothing.

The mid-run kill point is drawn from `random.Random(seed)` (a fresh seed per session); the seed is
in the assertion messages and `SPEECHPAIRS_RESUME_SEED=<seed>` replays it.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from schemas.config import load_config
from storage.objectstore import open_store
from storage.reader import open_dataset
from storage.versions import file_key, list_versions, read_manifest, resolve_version
from tests.support.fake_llm_server import FakeLLMServer
from tests.support.paths import REPO
from tests.support.resume_support import KILL_POINTS

SAMPLE = REPO / "examples" / "sample_corpus"
SOURCE = "sample"  # row ids are "<source dataset>/<manifest id>"
RUN_TIMEOUT_S = 120

pytestmark = pytest.mark.slow


# -- corpus, config, subprocess ---------------------------------------------------------------------


def write_corpus(path: Path, *, copies: int, missing: int = 0) -> dict[str, str | None]:
    """The sample corpus listed `copies` times under distinct ids, each transcript tagged `clip=<id>`
    for the fake LLM server, plus `missing` rows whose audio file does not exist (quarantined).
    Returns row id → the clip marker the LLM sees (None for clips that never reach the LLM)."""
    ids: dict[str, str | None] = {}
    with path.open("w") as f:
        for r in range(copies):
            for line in (SAMPLE / "manifest.jsonl").read_text().splitlines():
                rec = json.loads(line)
                clip = f"{rec['id']}__r{r:02d}"
                rec["id"] = clip
                rec["path"] = str(SAMPLE / rec["path"])
                rec["transcript"] = f"{rec.get('transcript') or ''} clip={clip}".strip()
                f.write(json.dumps(rec) + "\n")
                ids[f"{SOURCE}/{clip}"] = clip
        for i in range(missing):
            clip = f"gone_{i:02d}"
            f.write(json.dumps({"id": clip, "path": str(path.parent / f"{clip}.wav"),
                                "transcript": f"never heard clip={clip}"}) + "\n")
            ids[f"{SOURCE}/{clip}"] = None
    return ids


def write_config(path: Path, *, manifest: Path, root: Path, dataset: str, server: FakeLLMServer,
                 shard_size: int, max_workers: int, concurrency: int, cache: bool) -> Path:
    config = {
        "sources": [{"path": str(manifest), "dataset": SOURCE, "language": "en", "allowed_roots": [str(SAMPLE)]}],
        "output": {"root": str(root), "dataset": dataset, "shard_size": shard_size},
        "llm": {"backend": "openai", "base_url": server.base_url, "model": "fake-served-model",
                "concurrency": concurrency, "timeout_s": 10, "backoff_s": 0.01, "cache": cache,
                "qc": {"min_words": 1}},
        "max_workers": max_workers,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Cli:
    """One `speechpairs run` subprocess in its own session (so its process group is ours to kill)."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @classmethod
    def start(cls, config: Path, env: dict[str, str], logs: Path, *, kill_point: str | None = None) -> Cli:
        entry = ["-m", "tests.support.resume_support", kill_point] if kill_point else ["-m", "flows.cli"]
        out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen([sys.executable, *entry, "run", str(config), "--no-progress"], cwd=REPO,
                                    env=env, stdout=fo, stderr=fe, start_new_session=True)
        return cls(proc, out, err)

    def kill9(self) -> int:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.wait(timeout=30)

    def wait(self) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise
        return rc, self.out.read_text(), self.err.read_text()

    def output(self) -> str:
        return f"--- stdout\n{self.out.read_text()[-3000:]}\n--- stderr\n{self.err.read_text()[-3000:]}"


def run_cli(config: Path, env: dict[str, str], logs: Path) -> tuple[int, str, str]:
    return Cli.start(config, env, logs).wait()


def poll(cond: Callable[[], bool], cli: Cli, what: str, timeout: float = 90.0, every: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if cli.proc.poll() is not None:
            pytest.fail(f"the run ended (rc {cli.proc.returncode}) before {what}\n{cli.output()}")
        if time.monotonic() > deadline:
            cli.kill9()
            pytest.fail(f"timed out waiting for {what}\n{cli.output()}")
        time.sleep(every)


def shards_reused(stdout: str) -> tuple[int, int]:
    m = re.search(r"shards:\s+(\d+) \((\d+) reused from an earlier attempt\)", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


# -- what is on disk --------------------------------------------------------------------------------


@dataclass
class Scenario:
    root: Path
    dataset: str
    config: Path
    ids: dict[str, str | None]
    env: dict[str, str]
    run_id: str = ""

    def __post_init__(self) -> None:
        from tasks.run import run_context

        self.run_id = run_context(load_config(self.config, [], environ={})).run_id

    @property
    def staging(self) -> Path:
        return self.root / self.dataset / "_staging" / self.run_id

    def markers(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((self.staging / "markers").glob("shard-*.json"))}

    def n_markers(self) -> int:
        return len(list((self.staging / "markers").glob("shard-*.json")))

    def shard_count(self) -> int:
        return int(json.loads((self.staging / "plan.json").read_text())["shards"])

    def shard_ids(self, index: int) -> list[str]:
        plan = json.loads((self.staging / "plan" / f"shard-{index:05d}.json").read_text())
        return [ref["id"] for ref in plan["refs"]]

    def staged_files(self, index: int) -> dict[str, tuple[int, int, int]]:
        """The Parquet objects shard `index` wrote (its data keys): name → (inode, mtime_ns, size)."""
        found = {}
        data = self.root / self.dataset / "data" / self.run_id
        for p in sorted([*data.glob(f"train-{index:05d}-*.parquet"), *data.glob(f"quarantine-{index:05d}-*.parquet")]):
            if p.exists():
                st = p.stat()
                found[p.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return found

    def plan_bytes(self) -> dict[str, bytes]:
        return {p.relative_to(self.staging).as_posix(): p.read_bytes()
                for p in [self.staging / "plan.json", *sorted((self.staging / "plan").glob("*.json"))]}

    def commit_state(self) -> str:
        """How far the commit got: planned/claimed/manifest/ref/committed."""
        ds = self.root / self.dataset
        if (self.staging / "committed.json").exists():
            return "committed"
        if (ds / "refs" / "latest.json").exists():
            return "ref"
        if any(ds.glob("v*/manifest.json")):
            return "manifest"
        if any(ds.glob("v*/_claim")):
            return "claimed"
        return "planned"


def committed_ids(sc: Scenario, version: str) -> tuple[list[str], list[str]]:
    """Row ids (through the reader API) and quarantine ids of a committed version."""
    store = open_store(str(sc.root))
    ds = open_dataset(f"{sc.root}/{sc.dataset}", version=version)
    rows = [i for batch in ds.iter_batches(columns=["id"]) for i in batch.column("id").to_pylist()]
    manifest = read_manifest(store, sc.dataset, version)
    quarantine: list[str] = []
    for q in manifest.quarantine:
        table = pq.read_table(pa.BufferReader(store.get_bytes(file_key(manifest, q))))
        quarantine += table.column("id").to_pylist()
    assert len(rows) == manifest.stats.rows and len(quarantine) == manifest.stats.quarantined
    return rows, quarantine


def assert_one_version_nothing_lost(sc: Scenario, context: str) -> str:
    """Exactly one committed version, `latest` on it, every input id exactly once (row or quarantine)."""
    store = open_store(str(sc.root))
    versions = list_versions(store, sc.dataset)
    assert len(versions) == 1, f"{context}: committed versions {versions} (want exactly one)"
    version = versions[0]
    assert resolve_version(store, sc.dataset, "latest") == version, context
    manifest = read_manifest(store, sc.dataset, version)
    assert manifest.lineage.run_id == sc.run_id, context
    rows, quarantine = committed_ids(sc, version)
    everything = rows + quarantine
    dupes = sorted({i for i in everything if everything.count(i) > 1})
    missing = sorted(set(sc.ids) - set(everything))
    extra = sorted(set(everything) - set(sc.ids))
    assert (dupes, missing, extra) == ([], [], []), (
        f"{context}: {len(dupes)} duplicate ids {dupes[:5]}, {len(missing)} missing {missing[:5]}, "
        f"{len(extra)} unexpected {extra[:5]}")
    assert set(quarantine) == {i for i, clip in sc.ids.items() if clip is None}, context
    assert manifest.stats.clips_in == len(sc.ids), context
    return version


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_env(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("resume-env")
    (home / "tmp").mkdir()  # a killed run's temp files land here, not in /tmp
    env = dict(os.environ)
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(home / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               TMPDIR=str(home / "tmp"), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def seed() -> int:
    return int(os.environ.get("SPEECHPAIRS_RESUME_SEED") or random.SystemRandom().randrange(2**32))


@dataclass
class MidRunKill:
    sc: Scenario
    server: FakeLLMServer
    seed: int
    after_markers: int
    delay_s: float
    rc_killed: int
    shards: int
    markers_at_kill: dict[str, bytes]
    staged_at_kill: dict[int, dict[str, tuple[int, int, int]]]
    plan_at_kill: dict[str, bytes]
    state_at_kill: str
    seen_at_kill: int
    resumed: tuple[int, str, str]
    seen_after_resume: int = 0


@pytest.fixture(scope="module")
def mid_run_kill(cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                 seed: int) -> Iterator[MidRunKill]:
    """A run killed with SIGKILL at a random moment, then resumed: once a random number (2…6) of its
    9 shards are marked finished, after a further random delay (0…0.3 s).

    Two shard tasks in parallel, one LLM request at a time each, 100 ms per request: the last
    shards are full (6 clips, ≥ 0.6 s each), so with ≤ 6 marked at least one has not started and
    the run has ≥ 0.6 s to go when the delay begins. The LLM cache is off, so a redone shard shows
    as new requests; 4 rows point at missing audio, so the quarantine is part of the count."""
    tmp = tmp_path_factory.mktemp("mid-run")
    server = FakeLLMServer(ok_delay_s=0.1).start()
    try:
        ids = write_corpus(tmp / "corpus.jsonl", copies=5, missing=4)  # 54 clips, 9 shards of 6
        config = write_config(tmp / "run.yaml", manifest=tmp / "corpus.jsonl", root=tmp / "out", dataset="midrun",
                              server=server, shard_size=6, max_workers=2, concurrency=1, cache=False)
        sc = Scenario(tmp / "out", "midrun", config, ids, cli_env)
        rng = random.Random(seed)
        after, delay = rng.randint(2, 6), round(rng.uniform(0.0, 0.3), 3)
        cli = Cli.start(config, cli_env, tmp / "killed")
        try:
            poll(lambda: sc.n_markers() >= after, cli, f"{after} shard markers")
            time.sleep(delay)
        finally:
            rc = cli.kill9()
        time.sleep(0.2)  # let the server log any request that was already on the wire
        shards = sc.shard_count()
        markers = sc.markers()
        indices = [int(name[len("shard-"):-len(".json")]) for name in markers]
        killed = MidRunKill(
            sc=sc, server=server, seed=seed, after_markers=after, delay_s=delay, rc_killed=rc, shards=shards,
            markers_at_kill=markers, staged_at_kill={i: sc.staged_files(i) for i in indices}, plan_at_kill=sc.plan_bytes(),
            state_at_kill=sc.commit_state(), seen_at_kill=len(server.seen),
            resumed=run_cli(config, cli_env, tmp / "resumed"))
        killed.seen_after_resume = len(server.seen)
        yield killed
    finally:
        server.stop()


# -- tests ------------------------------------------------------------------------------------------


def test_kill_9_mid_run_then_resume_commits_once_with_nothing_lost_or_redone(mid_run_kill: MidRunKill) -> None:
    k, sc = mid_run_kill, mid_run_kill.sc
    why = (f"seed={k.seed} (SPEECHPAIRS_RESUME_SEED={k.seed} replays the kill point): killed {k.delay_s} s "
           f"after marker {k.after_markers}, with {len(k.markers_at_kill)}/{k.shards} shards marked")
    # The kill really landed mid-run: SIGKILL, some but not all shards finished, no version started.
    assert k.rc_killed == -signal.SIGKILL, why
    assert k.shards == 9 and k.after_markers <= len(k.markers_at_kill) < k.shards, why
    assert k.state_at_kill == "planned", why  # no version claimed, let alone committed

    rc, out, err = k.resumed
    assert rc == 0, f"{why}\n{out}\n{err}"
    assert f"{sc.dataset} committed v0001" in out, f"{why}\n{out}"
    # Stable run key: one staging area, named after the config and corpus, reused by the re-run.
    assert [p.name for p in (sc.root / sc.dataset / "_staging").iterdir()] == [sc.run_id], why
    assert sc.plan_bytes() == k.plan_at_kill, f"{why}: the resumed run re-planned its shards"
    assert assert_one_version_nothing_lost(sc, why) == "v0001"

    # Shards finished before the kill were skipped: marker and staged Parquet untouched (same bytes,
    # same inode and mtime: not rewritten), none of their clips sent to the LLM again, counted as reused.
    after = sc.markers()
    assert set(after) == {f"shard-{i:05d}.json" for i in range(k.shards)}, why
    for name, body in k.markers_at_kill.items():
        assert after[name] == body, f"{why}: {name} was rewritten by the re-run"
    for index, files in k.staged_at_kill.items():
        assert files and sc.staged_files(index) == files, f"{why}: shard {index}'s staged output was redone"
    assert shards_reused(out) == (k.shards, len(k.markers_at_kill)), f"{why}\n{out}"

    marked = {int(n[len("shard-"):-len(".json")]) for n in k.markers_at_kill}
    def llm_clips(shards: set[int]) -> set[str]:  # the clip markers the LLM sees for those shards
        return {clip for s in shards for i in sc.shard_ids(s) if (clip := sc.ids[i]) is not None}

    done_clips = llm_clips(marked)
    todo_clips = llm_clips(set(range(k.shards)) - marked)
    new = {s.clip or "" for s in k.server.seen[k.seen_at_kill:k.seen_after_resume]}
    assert not new & done_clips, f"{why}: clips of finished shards asked again: {sorted(new & done_clips)[:5]}"
    # With the request cache off, every clip of an unfinished shard is generated (again) by the re-run.
    assert new == todo_clips, f"{why}: re-run asked for {len(new)} clips, expected the {len(todo_clips)} unfinished"
    # Every row is the resumed run's own (one run id, provenance and lineage agree).
    table = open_dataset(f"{sc.root}/{sc.dataset}").to_arrow(columns=["provenance"])
    assert {p["run_id"] for p in table.column("provenance").to_pylist()} == {sc.run_id}, why


def test_same_config_after_success_commits_nothing_new(mid_run_kill: MidRunKill, tmp_path: Path) -> None:
    k, sc = mid_run_kill, mid_run_kill.sc
    assert k.resumed[0] == 0, k.resumed
    ds = sc.root / sc.dataset
    ref_before = (ds / "refs" / "latest.json").read_bytes()
    committed_before = (sc.staging / "committed.json").read_bytes()
    seen_before = len(k.server.seen)
    rc, out, err = run_cli(sc.config, sc.env, tmp_path / "again")
    assert rc == 0, f"{out}\n{err}"
    assert f"{sc.dataset} already committed as v0001" in out, out
    assert shards_reused(out) == (k.shards, k.shards), out
    assert list_versions(open_store(str(sc.root)), sc.dataset) == ["v0001"]
    assert sorted(p.name for p in ds.iterdir() if p.name.startswith("v")) == ["v0001"]  # not even a claim
    assert (ds / "refs" / "latest.json").read_bytes() == ref_before
    assert (sc.staging / "committed.json").read_bytes() == committed_before
    assert len(k.server.seen) == seen_before  # nothing generated


@pytest.fixture(scope="module")
def commit_server() -> Iterator[FakeLLMServer]:
    server = FakeLLMServer().start()
    try:
        yield server
    finally:
        server.stop()


def _small_scenario(tmp: Path, name: str, server: FakeLLMServer, env: dict[str, str]) -> Scenario:
    ids = write_corpus(tmp / "corpus.jsonl", copies=1, missing=1)  # 11 clips, 4 shards
    config = write_config(tmp / "run.yaml", manifest=tmp / "corpus.jsonl", root=tmp / "out", dataset=name,
                          server=server, shard_size=3, max_workers=2, concurrency=4, cache=True)
    return Scenario(tmp / "out", name, config, ids, env)


@dataclass
class CommitKill:
    sc: Scenario
    rc_killed: int
    killed_output: str
    state_at_kill: str
    markers_at_kill: dict[str, bytes]
    resumed: tuple[int, str, str]


@pytest.fixture(scope="module")
def commit_kills(commit_server: FakeLLMServer, cli_env: dict[str, str],
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, CommitKill]:
    """For each kill point of the commit protocol: a run that SIGKILLs itself there, then the re-run.
    The scenarios are independent (own root and dataset), so they run side by side."""
    scenarios = {point: _small_scenario(tmp_path_factory.mktemp(f"commit-{point}"), f"kill-{point}",
                                        commit_server, cli_env) for point in KILL_POINTS}
    killed = {point: Cli.start(sc.config, cli_env, sc.root.parent / "killed", kill_point=point)
              for point, sc in scenarios.items()}
    try:
        rcs = {point: cli.wait()[0] for point, cli in killed.items()}
    finally:
        for cli in killed.values():
            cli.kill9()
    states = {point: (sc.commit_state(), sc.markers()) for point, sc in scenarios.items()}
    resumed = {point: Cli.start(sc.config, cli_env, sc.root.parent / "resumed") for point, sc in scenarios.items()}
    return {point: CommitKill(sc, rcs[point], killed[point].output(), states[point][0], states[point][1],
                              resumed[point].wait()) for point, sc in scenarios.items()}


EXPECTED_STATE = {"before-claim": "planned", "claimed": "claimed", "manifest-written": "manifest",
                  "ref-moved": "ref"}


@pytest.mark.parametrize("point", [
    "before-claim",
    "claimed",
    "manifest-written",
    "ref-moved",
])
def test_kill_9_inside_the_commit_then_resume_commits_once(commit_kills: dict[str, CommitKill], point: str) -> None:
    k = commit_kills[point]
    sc = k.sc
    why = f"killed at {point!r} of the commit (state {k.state_at_kill})"
    assert k.rc_killed == -signal.SIGKILL, f"{why}\n{k.killed_output}"
    assert k.state_at_kill == EXPECTED_STATE[point], why
    assert len(k.markers_at_kill) == 4, why
    rc, out, err = k.resumed
    assert rc == 0, f"{why}\n{out}\n{err}"
    assert shards_reused(out) == (4, 4), f"{why}\n{out}"
    assert sc.markers() == k.markers_at_kill, why
    version = assert_one_version_nothing_lost(sc, why)
    # The version the first attempt started is the one that lands: a claim of this very run is
    # taken up again, a manifest it wrote is referenced instead of published twice.
    assert version == "v0001", why
    assert f"{sc.dataset} committed {version}" in out, f"{why}\n{out}"
    store = open_store(str(sc.root))
    assert json.loads(store.get_bytes(f"{sc.dataset}/_staging/{sc.run_id}/committed.json")) == {"version": version}

