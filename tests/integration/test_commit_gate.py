"""No empty, mostly-quarantined or outage-frozen version: the commit gate, alone and in real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.generate import run_plain
from schemas.config import OutputConfig, RunConfig, parse_config
from storage.layout import REFUSED
from storage.objectstore import open_store
from storage.versions import list_versions, read_ref
from tasks.commit_gate import CommitRefused, QuarantineExample, check_commit, shard_needs_redo
from tasks.run import run_context
from tests.support.fake_llm_server import FakeLLMServer
from tests.support.paths import REPO

SAMPLE = REPO / "examples" / "sample_corpus"


def _examples(*reasons: str) -> dict[str, QuarantineExample]:
    return {r: QuarantineExample(id=f"c/{r}-1", message=f"c/{r}-1.wav: {r} happened") for r in reasons}


# ------------------------------------------------------------------------------------------ unit


def test_a_healthy_run_is_committed() -> None:
    assert check_commit(clips_in=10, rows=9, by_reason={"too_short": 1}, examples=_examples("too_short"),
                        output=OutputConfig()) is None


def test_no_row_is_refused_unless_allowed() -> None:
    refusal = check_commit(clips_in=3, rows=0, by_reason={"missing_file": 2, "silent": 1},
                           examples=_examples("missing_file", "silent"), output=OutputConfig())
    assert refusal is not None and refusal.kind == "empty"
    assert "all 3 were quarantined" in refusal.message and "output.allow_empty" in refusal.message
    assert "missing_file=2 (e.g. c/missing_file-1: c/missing_file-1.wav: missing_file happened)" in refusal.message
    assert refusal.message.index("missing_file=2") < refusal.message.index("silent=1")  # largest first
    assert check_commit(clips_in=3, rows=0, by_reason={"missing_file": 3}, examples={},
                        output=OutputConfig(allow_empty=True)) is None


def test_a_quarantine_share_above_the_ratio_is_a_systemic_fault() -> None:
    by_reason = {"too_short": 5, "silent": 1}
    refusal = check_commit(clips_in=10, rows=4, by_reason=by_reason, examples=_examples("too_short"),
                           output=OutputConfig())
    assert refusal is not None and refusal.kind == "systemic"
    assert "6 of 10 clips (60.0%)" in refusal.message and "max_quarantine_ratio=0.5" in refusal.message
    assert "too_short=5 (e.g. c/too_short-1:" in refusal.message and "silent=1" in refusal.message
    assert check_commit(clips_in=10, rows=4, by_reason=by_reason, examples={},
                        output=OutputConfig(max_quarantine_ratio=0.6)) is None
    assert check_commit(clips_in=10, rows=5, by_reason={"too_short": 5}, examples={},
                        output=OutputConfig()) is None  # exactly at the ratio is allowed


def test_transient_failures_block_a_commit_up_to_their_own_ratio() -> None:
    by_reason = {"llm_unavailable": 1, "qc_refusal": 1}
    refusal = check_commit(clips_in=100, rows=98, by_reason=by_reason, examples=_examples("llm_unavailable"),
                           output=OutputConfig())
    assert refusal is not None and refusal.kind == "transient"
    assert "1 of 100 clips" in refusal.message and "llm_unavailable=1" in refusal.message
    assert "qc_refusal" not in refusal.message and "again" in refusal.message
    assert check_commit(clips_in=100, rows=98, by_reason=by_reason, examples={},
                        output=OutputConfig(max_transient_ratio=0.01)) is None
    # A run killed by an outage is reported as the outage, not as "empty".
    outage = check_commit(clips_in=5, rows=0, by_reason={"llm_unavailable": 5}, examples={}, output=OutputConfig())
    assert outage is not None and outage.kind == "transient"


def test_which_finished_shards_a_rerun_redoes() -> None:
    assert shard_needs_redo({"storage_error": 1}, {"audio": 1}, after_refusal=False)
    assert not shard_needs_redo({"qc_refusal": 2}, {"llm": 2}, after_refusal=False)
    assert shard_needs_redo({"qc_refusal": 2}, {"llm": 2}, after_refusal=True)
    assert not shard_needs_redo({"missing_file": 2}, {"audio": 2}, after_refusal=True)


def test_commit_policy_is_not_part_of_the_run_id() -> None:
    base = {"sources": [{"path": "m.jsonl"}]}
    a = parse_config(base, environ={})
    b = parse_config(base, ["output.allow_empty=true", "output.max_quarantine_ratio=0.9",
                            "output.max_transient_ratio=0.1"], environ={})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != parse_config(base, ["output.shard_size=7"], environ={}).config_hash()


# ----------------------------------------------------------------------------------- real runs


def _manifest(path: Path, good: int, missing: int, marker: bool = False) -> Path:
    """`good` sample clips (transcripts tagged `clip=<id>` for the fake LLM) + `missing` absent files."""
    lines = [json.loads(x) for x in (SAMPLE / "manifest.jsonl").read_text().splitlines()][:good]
    with path.open("w") as f:
        for rec in lines:
            rec["path"] = str(SAMPLE / rec["path"])
            if marker:
                rec["transcript"] = f"{rec.get('transcript') or 'no text'} clip={rec['id']}"
            f.write(json.dumps(rec) + "\n")
        for i in range(missing):
            f.write(json.dumps({"id": f"ghost{i}", "path": str(path.parent / f"ghost{i}.wav")}) + "\n")
    return path


def _config(tmp_path: Path, manifest: Path, *overrides: str) -> RunConfig:
    return parse_config({"sources": [{"path": str(manifest), "dataset": "g", "allowed_roots": [str(SAMPLE)]}],
                         "output": {"root": str(tmp_path / "out"), "dataset": "gate", "shard_size": 3}},
                        list(overrides), environ={})


def test_a_run_where_no_clip_survives_publishes_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, _manifest(tmp_path / "m.jsonl", good=0, missing=4))
    store = open_store(str(tmp_path / "out"))
    with pytest.raises(CommitRefused) as err:
        run_plain(config)
    assert err.value.kind == "empty" and "missing_file=4 (e.g. g/ghost0:" in str(err.value)
    assert list_versions(store, "gate") == [] and read_ref(store, "gate") is None
    ctx = run_context(config)
    assert store.exists(f"{ctx.staging}/{REFUSED}")  # staging kept, refusal recorded
    assert len(list(store.list(f"{ctx.staging}/markers/"))) == 2
    # Allowed explicitly: an empty version, same run (the policy is not in the run id).
    manifest = run_plain(config.model_copy(update={"output": config.output.model_copy(
        update={"allow_empty": True})}))
    assert manifest.lineage.version == "v0001" and manifest.stats.rows == 0 and manifest.stats.quarantined == 4
    assert manifest.lineage.run_id == ctx.run_id


def test_mostly_quarantined_stops_then_a_raised_ratio_reuses_every_shard(tmp_path: Path) -> None:
    config = _config(tmp_path, _manifest(tmp_path / "m.jsonl", good=2, missing=4))
    store = open_store(str(tmp_path / "out"))
    with pytest.raises(CommitRefused) as err:
        run_plain(config)
    assert err.value.kind == "systemic" and "4 of 6 clips (66.7%)" in str(err.value)
    assert "missing_file=4 (e.g. g/ghost0: " in str(err.value) and "file not found" in str(err.value)
    assert list_versions(store, "gate") == []
    ctx = run_context(config)
    markers = {k: store.get_with_etag(k)[1] for k in store.list(f"{ctx.staging}/markers/")}
    raised = config.model_copy(update={"output": config.output.model_copy(update={"max_quarantine_ratio": 0.7})})
    manifest = run_plain(raised)
    assert manifest.lineage.version == "v0001" and (manifest.stats.rows, manifest.stats.quarantined) == (2, 4)
    # No shard was redone: missing files stay missing, so their markers were reused as they were.
    assert {k: store.get_with_etag(k)[1] for k in store.list(f"{ctx.staging}/markers/")} == markers


def test_an_llm_outage_is_retried_by_the_next_run_never_frozen_into_a_version(tmp_path: Path) -> None:
    manifest_path = _manifest(tmp_path / "m.jsonl", good=6, missing=0, marker=True)
    ids = [json.loads(x)["id"] for x in manifest_path.read_text().splitlines()]
    down = ids[:2]  # the server fails these two only, for the whole first run
    server = FakeLLMServer(scripts={c: ["503"] for c in down}).start()
    try:
        config = _config(tmp_path, manifest_path, "llm.backend=openai", f"llm.base_url={server.base_url}",
                         "llm.model=fake-served-model", "llm.max_retries=1", "llm.backoff_s=0",
                         "llm.timeout_s=5")
        store = open_store(str(tmp_path / "out"))
        with pytest.raises(CommitRefused) as err:
            run_plain(config)
        assert err.value.kind == "transient" and "2 of 6 clips" in str(err.value)
        assert "llm_unavailable=2" in str(err.value) and "503" in str(err.value)
        assert list_versions(store, "gate") == [] and read_ref(store, "gate") is None
        first = {c: len(server.requests_for(c)) for c in ids}
        assert all(first[c] == 2 for c in down) and all(first[c] == 1 for c in ids[2:])
        server.scripts = {}  # the service is back
        manifest = run_plain(config)
        assert manifest.lineage.version == "v0001"
        assert (manifest.stats.rows, manifest.stats.quarantined) == (6, 0)
        # Only the failed clips went to the model again; the rest came from the run's request cache.
        assert {c: len(server.requests_for(c)) - first[c] for c in ids} == {c: int(c in down) for c in ids}
        # And a third launch is "already committed": nothing redone, nothing sent.
        sent = len(server.seen)
        assert run_plain(config).lineage.version == "v0001" and len(server.seen) == sent
    finally:
        server.stop()


@pytest.mark.usefixtures("prefect_harness")
def test_cli_exits_3_and_names_the_reasons_when_nothing_survives(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    manifest = _manifest(tmp_path / "m.jsonl", good=1, missing=3)
    rc = main(["run", str(REPO / "examples" / "quickstart.yaml"), "--no-progress",
               "--set", f"sources.0.path={manifest}", "--set", f"sources.0.allowed_roots=[{SAMPLE}]",
               "--set", f"output.root={tmp_path / 'out'}",
               "--set", "output.dataset=gate"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "not committed (systemic): 3 of 4 clips (75.0%)" in err and "missing_file=3" in err
    assert "run the same command again to resume" not in err
    assert not (tmp_path / "out" / "gate" / "v0001").exists()
    assert not (tmp_path / "out" / "gate" / "refs").exists()
