"""One home per storage concept: run-layout keys (storage/layout.py), version keys (storage/versions.py),
S3 clients (storage/s3.py) and Prefect credentials (storage/credentials.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from storage.layout import RunLayout, cache_scope_prefix, probe_key, staging_prefix, staging_run
from storage.versions import (
    card_key,
    claim_key,
    config_key,
    data_path,
    manifest_key,
    quarantine_path,
    ref_key,
    refs_prefix,
    version_key,
)
from tests.support.paths import REPO


def test_run_layout_keys_are_the_ones_a_resumed_run_looks_for() -> None:
    """A resumed run finds its work by these names: any change strands every staging area."""
    run = RunLayout(staging_prefix("demo", "run-abc"))
    assert run.staging == "demo/_staging/run-abc"
    assert run.plan == "demo/_staging/run-abc/plan.json"
    assert run.shard_plan(3) == "demo/_staging/run-abc/plan/shard-00003.json"
    assert run.shard(3) == "demo/_staging/run-abc/shards/train-00003.parquet"
    assert run.quarantine_part(3) == "demo/_staging/run-abc/quarantine/part-00003.parquet"
    assert run.marker(3) == "demo/_staging/run-abc/markers/shard-00003.json"
    assert run.marker(3).startswith(run.markers) and not run.plan.startswith(run.markers)
    assert run.cache_scope(3) == "shard-00003"
    assert cache_scope_prefix(run.staging, run.cache_scope(3)) == "demo/_staging/run-abc/llm-cache/shard-00003/"
    assert cache_scope_prefix("", "all") == "llm-cache/all/"
    assert (run.lease, run.refused, run.committed) == (
        "demo/_staging/run-abc/lease.json", "demo/_staging/run-abc/refused.json",
        "demo/_staging/run-abc/committed.json")
    assert probe_key("demo", "x1") == "demo/_staging/probe-x1"
    assert staging_run("demo", run.marker(0)) == "demo/_staging/run-abc/"
    assert staging_run("demo", probe_key("demo", "x1")) is None  # a probe is no run
    assert staging_run("demo", "demo/v0001/manifest.json") is None
    with pytest.raises(ValueError, match="invalid dataset name"):
        staging_prefix("../up", "run-abc")


def test_version_keys() -> None:
    assert manifest_key("demo", "v0007") == "demo/v0007/manifest.json"
    assert (card_key("demo", "v0007"), config_key("demo", "v0007"), claim_key("demo", "v0007")) == (
        "demo/v0007/README.md", "demo/v0007/config.yaml", "demo/v0007/_claim")
    assert version_key("demo", "v0007", data_path(0, 12)) == "demo/v0007/data/train-00000-of-00012.parquet"
    assert version_key("demo", "v0007", quarantine_path(2)) == "demo/v0007/quarantine/part-00002.parquet"
    assert (refs_prefix("demo"), ref_key("demo", "stable")) == ("demo/refs/", "demo/refs/stable.json")
    with pytest.raises(ValueError, match="not a version name"):
        version_key("demo", "latest", "manifest.json")


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_storage_imports_prefect_only_for_a_credentials_block() -> None:
    found = {p.relative_to(REPO).as_posix() for p in _modules("storage")
             if any(n.split(".")[0] in ("prefect", "prefect_aws") for n in _imports(p))}
    assert found == {"storage/credentials.py"}


def test_every_s3_client_comes_from_storage() -> None:
    """No module outside storage/ imports boto3, s3fs or pyarrow's S3 filesystem (botocore's
    exception classes are fine: the CLI names a storage error)."""
    makers = ("boto3", "s3fs")
    offenders = []
    for path in _modules("flows", "tasks", "schemas"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = _imports(path)
        uses_s3fs = any(isinstance(n, ast.Attribute | ast.Name) and "S3FileSystem" in ast.unparse(n)
                        for n in ast.walk(tree))
        if uses_s3fs or any(n.split(".")[0] in makers for n in names):
            offenders.append(path.relative_to(REPO).as_posix())
    assert offenders == []


# Pieces of staging and version keys: an f-string holding one builds a key outside its one home.
KEY_PIECES = ("_staging", "/markers/", "/shards/", "/quarantine/", "llm-cache/", "plan.json", "/plan/",
              "committed.json", "refused.json", "lease.json", "manifest.json", "/refs/", "_claim")
KEY_HOMES = {"storage/layout.py", "storage/versions.py"}


def test_keys_are_built_only_by_the_layout_and_versions_helpers() -> None:
    builders = []
    for path in _modules("flows", "tasks", "storage"):
        rel = path.relative_to(REPO).as_posix()
        if rel in KEY_HOMES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                builders += [f"{rel}:{node.lineno} {piece}" for piece in KEY_PIECES if piece in text]
    assert builders == []
