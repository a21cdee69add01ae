"""A run you can explain: the resolved config is stored with its version (listed, verified, shown,
diffed by setting name), and the run key is the canonical config's, so a deployment's relative
paths and the CLI's absolute ones are one run (one lease, one version)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.generate import run_generate
from schemas.canonical import REDACTED, canonical_config, config_record, redact_secrets
from schemas.config import RunConfig, load_config, parse_config
from schemas.manifest import Manifest
from storage.objectstore import open_store
from storage.reader import open_dataset
from storage.verify import verify_version
from storage.versions import config_key, list_versions, manifest_key, read_config, read_manifest
from tasks.run import run_context
from tests.support.datasets_support import SAMPLE, make_version

# --------------------------------------------------------------------------------------------
# Canonical config (pure)
# --------------------------------------------------------------------------------------------


def _deployment_params(shard_size: int = 4) -> dict:
    """prefect.yaml-style parameters: paths relative to the project directory."""
    return {"sources": [{"path": "corpus/manifest.jsonl", "dataset": "sample", "language": "en"}],
            "output": {"root": "./data", "dataset": "sample", "shard_size": shard_size},
            "llm": {"backend": "template"}}


def test_canonical_config_resolves_relative_paths_against_the_base_and_is_idempotent(tmp_path: Path) -> None:
    base = tmp_path / "project"
    relative = parse_config({**_deployment_params(),
                             "describe": {"bins": "bins/mine.json", "instruction_pool": "../pool.txt"},
                             "features": {"asr": {"model": "./ckpt/small.pt"},
                                          "classifiers": [{"attribute": "emotion", "model": "org/emotion-model"},
                                                          {"attribute": "gender", "model": "./models/gender"}]}},
                            environ={})
    canon = canonical_config(relative, base)
    assert canon.sources[0].path == str(base / "corpus" / "manifest.jsonl")
    assert canon.output.root == str(base / "data")
    assert canon.describe.bins == str(base / "bins" / "mine.json")
    assert canon.describe.instruction_pool == str(tmp_path / "pool.txt")  # '..' normalised away
    assert canon.features.asr.model == str(base / "ckpt" / "small.pt")
    assert [c.model for c in canon.features.classifiers] == ["org/emotion-model", str(base / "models" / "gender")]
    assert canonical_config(canon, tmp_path / "elsewhere") == canon  # idempotent, whatever the base
    assert canon.config_hash() != relative.config_hash()

    s3 = parse_config({"sources": [{"path": "s3://bucket/corpus/", "kind": "hf_parquet"}],
                       "output": {"root": "s3://bucket/out"}}, environ={})
    assert canonical_config(s3, base) == s3  # URIs are left as written


def test_defaults_spelled_out_or_omitted_hash_the_same(tmp_path: Path) -> None:
    omitted = parse_config(_deployment_params(), environ={})
    spelled = parse_config({**_deployment_params(), "llm": {"backend": "template", "temperature": 0.05, "top_p": 1.0},
                            "audio": {"max_duration_s": 30.0}, "output": {**_deployment_params()["output"],
                                                                          "compression": "zstd"}}, environ={})
    assert canonical_config(omitted, tmp_path).config_hash() == canonical_config(spelled, tmp_path).config_hash()
    # Commit policy, runner and cluster settings stay out of the key, as before.
    policy = parse_config(_deployment_params(), ["output.max_quarantine_ratio=0.9", "runner=sequential",
                                                 "max_workers=7", "output.when_running=wait"], environ={})
    assert canonical_config(policy, tmp_path).config_hash() == canonical_config(omitted, tmp_path).config_hash()


def test_recorded_config_redacts_credentials_but_keeps_where_they_come_from() -> None:
    config = parse_config({"sources": [{"path": "/corpus/m.jsonl",
                                        "labels": {"api_key": "abc123", "note": "token sk-ABCDEFGHIJKLMNOPQRSTUV",
                                                   "room": "studio"}}],
                           "llm": {"backend": "template",
                                   "system_prompt": "use hf_abcdefghijklmnopqrstuvwxyz0123 and "
                                                    "Bearer abcdefghijklmnop.qrs please"},
                           "s3": {"credentials_block": "prod-s3"}}, environ={})
    record = config_record(config)
    labels = record["sources"][0]["labels"]
    assert labels == {"api_key": REDACTED, "note": f"token {REDACTED}", "room": "studio"}
    assert record["llm"]["system_prompt"] == f"use {REDACTED} and {REDACTED} please"
    assert record["llm"]["api_key_env"] == "SPEECHPAIRS_LLM_API_KEY"  # names the variable, not the key
    assert record["s3"]["credentials_block"] == "prod-s3"
    assert record["llm"]["temperature"] == 0.05 and record["output"]["shard_size"] == 1000  # defaults filled
    # Defensive: whatever reaches storage is redacted again (a URL with user info, a signed query).
    assert redact_secrets({"u": "https://bob:hunter2@example.org/x?X-Amz-Signature=abc&part=2",
                           "aws": "AKIAABCDEFGHIJKLMNOP"}) == {
        "u": f"https://{REDACTED}@example.org/x?X-Amz-Signature={REDACTED}&part=2", "aws": REDACTED}


# --------------------------------------------------------------------------------------------
# The config file of a committed version
# --------------------------------------------------------------------------------------------


def _version(tmp_path: Path, *overrides: str) -> Manifest:
    return make_version(str(tmp_path / "out"), "rec", workdir=tmp_path, overrides=list(overrides))


def test_committed_version_lists_verifies_and_shows_its_config(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _version(tmp_path, "llm.system_prompt=key sk-ABCDEFGHIJKLMNOPQRSTUVWX inside")
    store = open_store(str(tmp_path / "out"))
    path = tmp_path / "out" / "rec" / "v0001" / "config.yaml"
    body = path.read_bytes()
    assert manifest.config is not None and manifest.config.path == "config.yaml"
    assert (manifest.config.bytes, manifest.config.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    on_disk = json.loads((tmp_path / "out" / "rec" / "v0001" / "manifest.json").read_text())
    assert on_disk["config"]["sha256"] == manifest.config.sha256  # listed in the manifest as written

    recorded = read_config(store, manifest)
    assert recorded is not None and recorded["llm"]["system_prompt"] == f"key {REDACTED} inside"
    assert b"sk-ABCDEF" not in body
    assert recorded["sources"][0]["path"] == str(tmp_path / "sample_x1.jsonl")  # absolute, as run
    # The record is a loadable config: without the redacted value it reproduces the version's key.
    recorded["llm"]["system_prompt"] = "key sk-ABCDEFGHIJKLMNOPQRSTUVWX inside"
    assert parse_config(recorded, environ={}).config_hash() == manifest.lineage.config_hash

    report = verify_version(store, "rec", "v0001")
    assert report.ok and report.config_checked
    assert main(["datasets", "verify", f"{tmp_path / 'out'}/rec@v0001"]) == 0
    assert ", config," in capsys.readouterr().out

    assert main(["datasets", "show", f"{tmp_path / 'out'}/rec@v0001"]) == 0
    out = capsys.readouterr().out
    assert f"config: config.yaml  bytes={len(body):,}" in out
    assert "    temperature: 0.05" in out and "    shard_size: 4" in out  # the settings, indented under llm/output

    path.write_bytes(body.replace(b"temperature: 0.05", b"temperature: 0.95"))  # same size, other bytes
    damaged = verify_version(store, "rec", "v0001")
    assert [p.path for p in damaged.problems] == ["config.yaml"] and "sha256 mismatch" in damaged.problems[0].problem
    assert main(["datasets", "verify", f"{tmp_path / 'out'}/rec@v0001"]) == 1
    path.unlink()
    assert [p.problem for p in verify_version(store, "rec", "v0001").problems] == ["missing"]


def test_diff_names_the_changed_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _version(tmp_path)
    second = _version(tmp_path, "llm.temperature=0.2", "describe.attributes=[gender, pitch]")
    assert second.lineage.version == "v0002"
    assert main(["datasets", "diff", f"{tmp_path / 'out'}/rec@v0001", "v0002"]) == 0
    out = capsys.readouterr().out
    settings = out.split("settings changes:\n", 1)[1].split("lineage", 1)[0].splitlines()
    before = json.dumps(["gender", "emotion", "age", "accent", "pitch", "speed", "volume", "noise"])
    assert settings == [f"  describe.attributes: {before} → {json.dumps(['gender', 'pitch'])}",
                        "  llm.temperature: 0.05 → 0.2"]
    assert "sampling.temperature: 0.05 → 0.2" in out  # the lineage hashes/values stay too


def test_a_version_without_config_still_opens_shows_diffs_and_verifies(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _version(tmp_path)
    _version(tmp_path, "llm.temperature=0.2")
    root = tmp_path / "out"
    store = open_store(str(root))
    # v0001 as committed before configs were recorded: no config.yaml, no manifest entry.
    old = json.loads((root / "rec" / "v0001" / "manifest.json").read_text())
    del old["config"]
    (root / "rec" / "v0001" / "manifest.json").write_text(json.dumps(old, indent=2))
    (root / config_key("rec", "v0001")).unlink()
    manifest = read_manifest(store, "rec", "v0001")
    assert manifest.config is None and read_config(store, manifest) is None

    assert open_dataset(f"{root}/rec@v0001").num_rows == 10
    report = verify_version(store, "rec", "v0001")
    assert report.ok and not report.config_checked
    assert main(["datasets", "verify", f"{root}/rec@v0001"]) == 0
    assert main(["datasets", "show", f"{root}/rec@v0001"]) == 0
    assert f"config: not recorded (this version was committed before run configs were stored; config hash " \
           f"{manifest.lineage.config_hash})" in capsys.readouterr().out
    assert main(["datasets", "diff", f"{root}/rec@v0001", "v0002"]) == 0
    out = capsys.readouterr().out
    assert "settings: not recorded for v0001" in out and "sampling.temperature: 0.05 → 0.2" in out
    assert (root / manifest_key("rec", "v0002")).exists()


# --------------------------------------------------------------------------------------------
# One run whoever launches it
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_deployment_relative_and_cli_absolute_launches_are_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "project"
    shutil.copytree(SAMPLE, project / "corpus")
    elsewhere = tmp_path / "ops"
    elsewhere.mkdir()
    cli_yaml = elsewhere / "run.yaml"  # the CLI's config names the same corpus and root absolutely
    cli_yaml.write_text(yaml.safe_dump({**_deployment_params(), "sources": [
        {"path": str(project / "corpus" / "manifest.jsonl"), "dataset": "sample", "language": "en"}],
        "output": {"root": str(project / "data"), "dataset": "sample", "shard_size": 4}}))

    monkeypatch.chdir(project)  # the worker's working directory (prefect.yaml's pull step)
    deployed = RunConfig.model_validate(_deployment_params())  # the flow parameter, as a deployment passes it
    monkeypatch.chdir(elsewhere)
    cli = load_config(cli_yaml, environ={})
    assert deployed.config_hash() != cli.config_hash()  # as given, the two spellings differ...

    monkeypatch.chdir(project)
    deployed_ctx = run_context(deployed)
    monkeypatch.chdir(elsewhere)
    assert run_context(cli).run_id == deployed_ctx.run_id  # ...canonically they are one run (one lease)
    assert run_context(cli).staging == deployed_ctx.staging

    monkeypatch.chdir(project)
    first = run_generate(deployed)
    assert (first.version, first.rows, first.already_committed) == ("v0001", 10, False)
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(cli_yaml), "--no-progress"]) == 0
    assert "sample already committed as v0001" in capsys.readouterr().out
    assert list_versions(open_store(str(project / "data")), "sample") == ["v0001"]
    recorded = read_config(open_store(str(project / "data")), read_manifest(open_store(str(project / "data")),
                                                                            "sample", "v0001"))
    assert recorded is not None and recorded["sources"][0]["path"] == str(project / "corpus" / "manifest.jsonl")
    assert recorded["output"]["root"] == str(project / "data")
