"""The generate flow end to end under one session-scoped Prefect test harness."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.generate import run_generate
from schemas.arrow import ROW_SCHEMA
from schemas.config import RunConfig, load_config
from storage.objectstore import open_store
from storage.reader import open_dataset
from storage.versions import file_key, read_manifest, resolve_version
from tasks.ingest import iter_refs
from tasks.llm import make_backend
from tasks.pipeline import process_shard
from tasks.plan import load_shard_plan, plan_run
from tasks.run import run_context
from tasks.segment.clips import shard_clips
from tasks.tally import ShardTally
from tests.support.corrupt_zoo import build_zoo
from tests.support.datasets_support import quarantine_rows
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3

pytestmark = pytest.mark.usefixtures("prefect_harness")


def quickstart(root: Path, *overrides: str) -> RunConfig:
    return load_config(REPO / "examples" / "quickstart.yaml", [f"output.root={root}", *overrides], environ={})


def committed_rows(root: Path, dataset: str, version: str) -> list[dict]:
    store = open_store(str(root))
    manifest = read_manifest(store, dataset, version)
    rows: list[dict] = []
    for shard in manifest.shards:
        table = pq.read_table(root / file_key(manifest, shard))
        assert table.schema.equals(ROW_SCHEMA)
        assert table.schema.metadata[b"huggingface"] == ROW_SCHEMA.metadata[b"huggingface"]
        rows += table.to_pylist()
    return rows


def test_sample_corpus_becomes_a_committed_version(tmp_path: Path) -> None:
    config = quickstart(tmp_path)
    summary = run_generate(config)
    assert (summary.clips_in, summary.rows, summary.quarantined) == (10, 10, 0)
    assert summary.shards == 3 and summary.version == "v0001"
    manifest = read_manifest(open_store(str(tmp_path)), "sample", "v0001")
    assert manifest.stats.rows == 10 and sum(s.rows for s in manifest.shards) == 10
    assert manifest.lineage.config_hash == config.config_hash()
    assert manifest.lineage.bins_version.startswith("speechpairs-bins/1+")
    assert manifest.stats.attribute_counts["Gender"]["Male"] >= 8
    rows = committed_rows(tmp_path, "sample", "v0001")
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == 10
    slt = by_id["sample/arctic_slt_a0009"]
    assert slt["seed_description"].startswith("[00:00-00:03] he turned sharply and faced gregson across the table (")
    assert "Gender: Female" in slt["seed_description"] and "Accent: American" in slt["seed_description"]
    assert slt["messages"][-1]["content"] == slt["seed_description"] + "\nWhat can you hear from the audio?"
    assert slt["generation"]["backend"] == "template" and slt["response"]
    awb = by_id["sample/arctic_awb_a0007"]
    assert awb["transcript"] is None and awb["seed_description"].startswith("[00:00-00:04] (Gender: Male")
    assert json.loads(awb["labels"])["accent"] == "Scottish"
    assert all(r["sampling_rate"] == 16000 and r["provenance"]["run_id"] == summary.run_id for r in rows)


def test_rerun_resumes_and_never_commits_twice(tmp_path: Path) -> None:
    config = quickstart(tmp_path, "output.dataset=resume")
    ctx = run_context(config)
    store = open_store(str(tmp_path))
    plan = plan_run(config, store, ctx.staging, ctx.run_id)
    # A first attempt that died after finishing shard 1 only.
    first = process_shard(load_shard_plan(store, ctx.staging, 1), config, store, ctx, make_backend(config.llm))
    summary = run_generate(config)
    assert summary.shards_skipped == 1 and summary.rows == plan.clips == 10
    again = run_generate(config)
    assert again.already_committed and again.version == summary.version == "v0001"
    assert again.shards_skipped == plan.shards
    assert resolve_version(store, "resume", "latest") == "v0001"
    ids = [r["id"] for r in committed_rows(tmp_path, "resume", "v0001")]
    assert len(ids) == len(set(ids)) == 10
    assert first.rows == 4
    # A changed config is a new run: new staging, new version.
    changed = run_generate(quickstart(tmp_path, "output.dataset=resume", "describe.format=desta2"))
    assert changed.version == "v0002" and changed.shards_skipped == 0


def test_corrupt_zoo_nothing_lost(tmp_path: Path, sample_corpus: Path) -> None:
    manifest_path, expected = build_zoo(tmp_path / "zoo", sample_corpus)
    # segment: never keeps the 40-s clip one `too_long` row (the default, auto, cuts it: checked below)
    config = quickstart(tmp_path / "out", f"sources.0.path={manifest_path}", "sources.0.dataset=zoo",
                        "output.dataset=zoo", "output.shard_size=5", "sources.0.segment.mode=never")
    summary = run_generate(config)
    assert summary.clips_in == len(expected) + 1  # + the line that is not JSON
    assert summary.clips_in == summary.rows + summary.quarantined
    quarantine = quarantine_rows(tmp_path / "out", "zoo", summary.version)
    got = {q["id"].split("/", 1)[1]: q["reason_code"] for q in quarantine}
    bad_json = [k for k in got if k.startswith("row@")]
    assert len(bad_json) == 1 and got.pop(bad_json[0]) == "bad_row"
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert all(q["message"] and q["stage"] in {"ingest", "audio"} for q in quarantine)
    rows = committed_rows(tmp_path / "out", "zoo", summary.version)
    assert {r["id"].split("/", 1)[1] for r in rows} == {k for k, v in expected.items() if v is None}
    assert summary.quarantine_by_reason["too_long"] == 1
    # Under the default (no segment block: auto) the 40-s tone is a recording: cut, and since a tone
    # holds no speech, one `no_speech` row under the recording's id instead of `too_long`.
    auto = quickstart(tmp_path / "out", f"sources.0.path={manifest_path}", "sources.0.dataset=zoo")
    assert auto.segment_for(auto.sources[0]).mode == "auto"
    long_ref = [r for r in iter_refs(auto.sources) if r.id == "zoo/too_long_40s"]
    acc = ShardTally()
    assert list(shard_clips(long_ref, auto, acc)) == []
    assert [(q.id, q.reason_code) for q in acc.quarantine] == [("zoo/too_long_40s", "no_speech")]


def test_cli_run_show_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "examples" / "quickstart.yaml")
    assert main(["run", config, "--set", f"output.root={tmp_path}", "--set", "output.dataset=cli",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "cli committed v0001" in out and "rows written: 10" in out and "quarantined:  0" in out
    assert main(["datasets", "show", f"{tmp_path}/cli@v0001"]) == 0
    assert "v0001" in capsys.readouterr().out
    assert main(["run", config, "--set", "llm.backend=gpt"]) == 2
    assert "llm.backend" in capsys.readouterr().err
    assert main(["run", config, "--set", "sources.0.path=/nonexistent/m.jsonl"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", config, "--set", f"sources.0.path={tmp_path / 'empty'}"]) == 2
    assert "the sources list no clips" in capsys.readouterr().err


@pytest.mark.s3
def test_flow_commits_to_s3_and_hf_decodes_the_shards(seaweedfs: SeaweedS3, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = seaweedfs.root(f"flow-{tmp_path.name}")
    config = quickstart(Path("unused"), f"output.root={root}", f"s3.endpoint_url={seaweedfs.endpoint_url}",
                        f"s3.region={seaweedfs.region}", "s3.addressing_style=path")
    summary = run_generate(config)
    assert summary.rows == 10 and summary.location == f"{root}/sample/v0001"
    store = open_store(root, config.s3)
    assert resolve_version(store, "sample", "latest") == "v0001"
    manifest = read_manifest(store, "sample", "v0001")
    assert seaweedfs.secret_key not in manifest.model_dump_json()
    assert main(["datasets", "show", f"{root}/sample@v0001", "--s3-endpoint-url", seaweedfs.endpoint_url,
                 "--s3-region", seaweedfs.region]) == 0
    shown = capsys.readouterr().out
    assert "version v0001" in shown and "rows 10" in shown and seaweedfs.secret_key not in shown
    for shard in manifest.shards:  # the stored row shards are what the manifest says
        assert store.sha256(file_key(manifest, shard)) == shard.sha256
    # Audio stored once: hf_data_files materialises the shards with their audio for `datasets`.
    handle = open_dataset(f"{root}/sample", "v0001", s3=config.s3)
    files = handle.hf_data_files(materialize_to=tmp_path / "materialized")
    assert len(files) == len(manifest.shards) and all(Path(f).is_file() for f in files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 10 and isinstance(ds.features["audio"], datasets.Audio)
    row = next(r for r in ds if r["id"] == "sample/librivox_ss01_0870")
    decoded = row["audio"].get_all_samples()
    assert decoded.sample_rate == 16000
    assert abs(decoded.data.shape[-1] / 16000 - 7.1) < 0.01
    assert row["attributes"]["Gender"] == "Male"


def test_run_publishes_summary_artifacts(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = run_generate(quickstart(tmp_path, "output.dataset=artifacts"))
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["run-summary", "attribute-distributions"])))
    latest = {a.key: a for a in sorted(found, key=lambda a: a.created)}
    table = latest["run-summary"].data
    assert f"{summary.dataset} {summary.version}" in (latest["run-summary"].description or "")
    assert "clips in" in str(table) and "quarantined" in str(table)
    assert "## Gender" in latest["attribute-distributions"].data


def test_commit_retry_after_lost_marker_does_not_publish_twice(tmp_path: Path) -> None:
    config = quickstart(tmp_path, "output.dataset=twice")
    first = run_generate(config)
    ctx = run_context(config)
    store = open_store(str(tmp_path))
    store.delete(f"{ctx.staging}/committed.json")  # as if the process died right after the manifest
    again = run_generate(config)
    assert again.version == first.version == "v0001"
    from storage.versions import list_versions

    assert list_versions(store, "twice") == ["v0001"]


def test_flow_with_openai_backend_retries_faults_and_loses_nothing(tmp_path: Path, sample_corpus: Path) -> None:
    from tests.support.fake_llm_server import FakeLLMServer

    markers = {"librivox_ss01_0870": "flaky", "librivox_ss01_0880": "slow", "cmu_cards_002": "bad"}
    with (tmp_path / "m.jsonl").open("w") as f:
        for line in (sample_corpus / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rec["path"] = str(sample_corpus / rec["path"])
            if rec["id"] in markers:
                rec["transcript"] = f"{rec['transcript']} clip={markers[rec['id']]}"
            f.write(json.dumps(rec) + "\n")
    server = FakeLLMServer(sleep_s=1.0, scripts={"flaky": ["500", "429", "malformed", "ok"],
                                                 "slow": ["sleep", "ok"], "bad": ["400"]}).start()
    try:
        config = quickstart(tmp_path / "out", f"sources.0.path={tmp_path / 'm.jsonl'}",
                            f"sources.0.allowed_roots=[{sample_corpus}]", "llm.backend=openai",
                            f"llm.base_url={server.base_url}", "llm.model=fake-served-model",
                            "llm.timeout_s=0.5", "llm.backoff_s=0.01", "llm.concurrency=4")
        summary = run_generate(config)
    finally:
        server.stop()
    assert (summary.clips_in, summary.rows, summary.quarantined) == (10, 9, 1)
    assert summary.quarantine_by_reason == {"llm_error": 1} and summary.quarantine_by_stage == {"llm": 1}
    assert len(server.requests_for("bad")) == 1  # a 400 is not retried
    rows = {r["id"].split("/", 1)[1]: r for r in committed_rows(tmp_path / "out", "sample", summary.version)}
    assert rows["librivox_ss01_0870"]["generation"]["attempts"] == 4
    assert rows["librivox_ss01_0880"]["generation"]["attempts"] == 2
    assert all(r["generation"]["backend"] == "openai" and r["generation"]["model"] == "fake-served-model"
               for r in rows.values())
    sent = server.requests_for("flaky")[-1].body["messages"]
    assert sent == rows["librivox_ss01_0870"]["messages"]
    quarantine = quarantine_rows(tmp_path / "out", "sample", summary.version)
    assert quarantine[0]["id"] == "sample/cmu_cards_002" and "400" in quarantine[0]["message"]


def test_unreachable_llm_endpoint_fails_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["run", str(REPO / "examples" / "quickstart.yaml"), "--set", f"output.root={tmp_path}",
            "--set", "llm.backend=openai", "--set", f"llm.base_url=http://127.0.0.1:{port}/v1",
            "--set", "llm.model=m"]
    assert main(args) == 2
    assert f"llm.base_url http://127.0.0.1:{port}/v1 is unreachable" in capsys.readouterr().err
    assert not (tmp_path / "sample").exists()


def test_changed_corpus_is_a_new_run_and_version(tmp_path: Path, sample_corpus: Path) -> None:
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(sample_corpus / "audio", corpus)
    (corpus / "arctic_slt_a0009.txt").write_text("he turned sharply and faced gregson across the table\n")
    overrides = (f"sources.0.path={corpus}", "sources.0.dataset=folder", "output.dataset=grow")
    first = run_generate(quickstart(tmp_path / "out", *overrides))
    unchanged = run_generate(quickstart(tmp_path / "out", *overrides))
    assert unchanged.already_committed and unchanged.run_id == first.run_id
    shutil.copy(corpus / "cmu_goforward.flac", corpus / "cmu_goforward_copy.flac")
    grown = run_generate(quickstart(tmp_path / "out", *overrides))
    assert (first.version, grown.version) == ("v0001", "v0002")
    assert grown.run_id != first.run_id and grown.rows == first.rows + 1 == 11
    slt = next(r for r in committed_rows(tmp_path / "out", "grow", "v0002") if r["id"] == "folder/arctic_slt_a0009")
    assert slt["transcript"] == "he turned sharply and faced gregson across the table"


def test_duplicate_ids_keep_one_row_and_quarantine_the_rest(tmp_path: Path, sample_corpus: Path) -> None:
    lines = (sample_corpus / "manifest.jsonl").read_text().splitlines()[:3]
    recs = [json.loads(line) | {"path": str(sample_corpus / json.loads(line)["path"])} for line in lines]
    first, dup = recs[1], recs[1] | {"path": recs[0]["path"]}  # same id, another file
    # Lay the file out so the duplicate's byte offset sorts *before* the first one's as text
    # (e.g. "1234" < "245"): the first listed occurrence must still win.
    body = [recs[0], first]
    while True:
        offsets = [0]
        for rec in body:
            offsets.append(offsets[-1] + len(json.dumps(rec)) + 1)
        if str(offsets[-1]) < str(offsets[1]) and offsets[-1] > offsets[1]:
            break
        body.append(recs[2] | {"id": f"filler{len(body)}"})
    body.append(dup)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in body))
    summary = run_generate(quickstart(tmp_path / "out", f"sources.0.path={tmp_path / 'm.jsonl'}",
                                      f"sources.0.allowed_roots=[{sample_corpus}]", "output.dataset=dups"))
    n = len(body)
    assert (summary.clips_in, summary.rows, summary.quarantine_by_reason) == (n, n - 1, {"duplicate_id": 1})
    rows = committed_rows(tmp_path / "out", "dups", summary.version)
    kept = next(r for r in rows if r["id"] == f"sample/{first['id']}")
    assert kept["audio_uri"] == first["path"]


def test_plain_runner_matches_the_flow(tmp_path: Path) -> None:
    from tests.support.datasets_support import make_version

    manifest = make_version(str(tmp_path / "plain"), "same", workdir=tmp_path)
    summary = run_generate(quickstart(tmp_path / "flow", "output.dataset=same"))
    plain_rows = committed_rows(tmp_path / "plain", "same", manifest.lineage.version)
    flow_rows = committed_rows(tmp_path / "flow", "same", summary.version)
    strip = ("provenance", "audio_uri")
    key = {r["id"]: {k: v for k, v in r.items() if k not in strip} for r in flow_rows}
    assert {r["id"]: {k: v for k, v in r.items() if k not in strip} for r in plain_rows} == key
    assert manifest.stats.rows == summary.rows == 10


def test_gc_flow_removes_an_abandoned_run_but_not_the_committed_version(tmp_path: Path) -> None:
    import os
    import time

    from flows.maintenance import gc_datasets
    from storage.versions import list_versions

    summary = run_generate(quickstart(tmp_path, "output.dataset=janitor"))
    store = open_store(str(tmp_path))
    store.put_bytes("janitor/_staging/run-abandoned/plan.json", b"{}")
    old = time.time() - 3 * 24 * 3600
    for p in (tmp_path / "janitor").rglob("*"):
        os.utime(p, (old, old))
    reports = gc_datasets(str(tmp_path), ["janitor"], older_than_hours=24)
    removed = sorted(p.prefix for p in reports[0].removed)
    assert "janitor/_staging/run-abandoned/" in removed
    assert list_versions(store, "janitor") == [summary.version]
    assert resolve_version(store, "janitor", "latest") == summary.version


def test_resumed_run_never_regenerates_a_finished_request(tmp_path: Path, sample_corpus: Path) -> None:
    """A run that died after its LLM calls but before its shards were marked done: the re-run
    finds every response in the request cache, so the server sees no second request."""
    from tests.support.fake_llm_server import FakeLLMServer

    server = FakeLLMServer().start()
    try:
        config = quickstart(tmp_path, "output.dataset=cached", "llm.backend=openai",
                            f"llm.base_url={server.base_url}", "llm.model=fake-served-model", "llm.qc.min_words=1")
        first = run_generate(config)
        assert first.rows == 10 and len(server.seen) == 10
        store = open_store(str(tmp_path))
        ctx = run_context(config)
        for key in [*store.list(f"{ctx.staging}/markers/"), *store.list(f"{ctx.staging}/shards/"),
                    f"{ctx.staging}/committed.json"]:
            store.delete(key)  # as if the process died before any shard was recorded as finished
        for key in store.list("cached/"):
            if not key.startswith("cached/_staging/"):
                store.delete(key)  # and before the version was committed
        again = run_generate(config)
        assert again.rows == 10 and again.shards_skipped == 0
        assert len(server.seen) == 10  # every response came from the cache
        changed = run_generate(config.model_copy(update={"llm": config.llm.model_copy(update={"temperature": 0.7})}))
        assert changed.rows == 10 and len(server.seen) == 20  # a changed setting is a new request
    finally:
        server.stop()
