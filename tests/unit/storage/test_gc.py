"""The janitor and audio stored once: audio files (shared by runs and versions) and their clip
indexes go only when no committed manifest of any dataset lists them, no surviving run's marker
claims them and they are old; a referenced one never goes, whoever wrote it."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from storage.gc import collect_garbage
from storage.layout import RunLayout, audio_prefix, clip_index_key, staging_prefix
from storage.lease import LeaseInfo
from storage.objectstore import LocalStore
from storage.reader import open_dataset
from storage.verify import verify_version
from tests.support.compose_support import (
    clip_key_of,
    commit_shards,
    commit_split,
    rows_table,
    write_audio_file,
    write_split_shard,
)
from tests.support.datasets_support import make_version

DS = "demo"
DAY = 86_400.0


def _age(root: Path, seconds: float = 2 * DAY) -> None:
    """Every file under `root` last modified `seconds` ago."""
    then = time.time() - seconds
    for p in root.rglob("*"):
        os.utime(p, (then, then))


def _audio_keys(store: LocalStore, dataset: str = DS) -> set[str]:
    return set(store.list(audio_prefix(dataset)))


def _index(dataset: str, run_id: str, index: int) -> str:
    return clip_index_key(dataset, clip_key_of(dataset, run_id, index))


def test_referenced_audio_files_stay_after_their_run_is_collected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    t0, t1 = rows_table([("a/0", "a"), ("a/1", "a")]), rows_table([("a/2", "a")])
    extra = rows_table([("a/q", "a")])  # a clip only the audio file holds (quarantined at the LLM stage)
    manifest = commit_split(store, DS, "run-1", [t0, t1], extras=[extra, None])
    audio = {s.audio.path for s in manifest.shards if s.audio is not None}
    assert len(audio) == 2
    _age(tmp_path)

    report = collect_garbage(store, DS, DAY)
    assert [p.kind for p in report.removed] == ["staging"]  # the run's markers; nothing of its audio
    assert report.referenced_audio == 2
    assert _audio_keys(store) == audio | {_index(DS, "run-1", 0), _index(DS, "run-1", 1)}
    collect_garbage(store, DS, 0.0, now=time.time() + 365 * DAY)
    assert _audio_keys(store) == audio | {_index(DS, "run-1", 0), _index(DS, "run-1", 1)}
    assert verify_version(store, DS, "v0001").ok
    rows = open_dataset(f"{tmp_path}/{DS}").to_arrow(["id", "audio"]).to_pylist()
    want = {r["id"]: r["audio"]["bytes"] for r in [*t0.to_pylist(), *t1.to_pylist()]}
    assert {r["id"]: r["audio"]["bytes"] for r in rows} == want


def test_an_audio_file_only_another_datasets_version_lists_stays(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    table = rows_table([("a/0", "a"), ("a/1", "a")])
    # Written by a run of A that never committed; only C's version (composed, layout 2) lists it.
    shard = write_split_shard(store, "A", "run-a", 0, table)
    commit_shards(store, "C", "compose-x", [shard], [table])
    assert shard.audio is not None
    _age(tmp_path)

    report = collect_garbage(store, "A", DAY)
    assert {p.kind for p in report.removed} == {"staging"}
    assert _audio_keys(store, "A") == {shard.audio.path, _index("A", "run-a", 0)}
    assert store.exists(shard.path)
    assert verify_version(store, "C", "v0001").ok


def test_an_unreferenced_old_audio_file_goes_with_its_index(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    dead = write_split_shard(store, DS, "run-dead", 0, rows_table([("a/0", "a"), ("a/1", "a")]))
    assert dead.audio is not None
    index = _index(DS, "run-dead", 0)
    _age(tmp_path)

    dry = collect_garbage(store, DS, DAY, dry_run=True)
    [entry] = [p for p in dry.removed if p.kind == "audio"]
    assert (entry.objects, entry.bytes) == (2, dead.audio.bytes + store.size(index))
    assert _audio_keys(store) == {dead.audio.path, index}  # a dry run removes nothing

    report = collect_garbage(store, DS, DAY)
    assert sorted(p.kind for p in report.removed) == ["audio", "data", "staging"]
    assert report.bytes_removed == dry.bytes_removed
    assert _audio_keys(store) == set() and report.referenced_audio == 0


def test_a_young_audio_file_stays(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    shard = write_split_shard(store, DS, "run-new", 0, rows_table([("a/0", "a")]), marker=False)
    assert shard.audio is not None
    report = collect_garbage(store, DS, DAY)
    assert report.removed == []
    assert [p.kind for p in report.kept_young] == ["data", "audio"]
    assert _audio_keys(store) == {shard.audio.path, _index(DS, "run-new", 0)}


def test_a_surviving_runs_marker_claims_its_audio_file_until_the_run_is_gone(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    # run-2 changed only the LLM: its shard reuses run-1's audio file (a clip-cache hit).
    first = write_split_shard(store, DS, "run-1", 0, rows_table([("a/0", "a")]), marker=False)
    assert first.audio is not None
    _age(tmp_path)
    write_split_shard(store, DS, "run-2", 0, rows_table([("a/0", "a")]), audio=first.audio)
    _age(tmp_path / DS / "data")  # run-2's staging (its marker) young: the run is resumable

    report = collect_garbage(store, DS, DAY)
    assert report.referenced_audio == 1 and not [p for p in report.removed if p.kind == "audio"]
    assert store.exists(first.audio.path)

    _age(tmp_path)  # run-2 abandoned too: its staging goes, and the audio file with it
    collect_garbage(store, DS, DAY)
    assert _audio_keys(store) == set()


def test_a_leased_run_keeps_indexed_audio_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    old = write_split_shard(store, DS, "run-old", 0, rows_table([("a/0", "a")]), marker=False)
    assert old.audio is not None
    orphan = write_audio_file(store, DS, "f" * 32, [rows_table([("a/9", "a")])])
    store.delete(clip_index_key(DS, "f" * 32))  # a file no index names (an abandoned attempt)
    layout = RunLayout(staging_prefix(DS, "run-live"))
    lease = LeaseInfo(holder="h", host="elsewhere", pid=1, started_at=datetime.now(UTC),
                      expires_at=datetime.now(UTC) + timedelta(minutes=5))
    store.put_bytes(layout.lease, lease.model_dump_json().encode())
    _age(tmp_path)

    # A working run may have found run-old's file through its index and not written its marker yet.
    collect_garbage(store, DS, DAY)
    assert _audio_keys(store) == {old.audio.path, _index(DS, "run-old", 0)}
    assert not store.exists(orphan.path)

    store.delete(layout.lease)
    collect_garbage(store, DS, DAY)
    assert _audio_keys(store) == set()


def test_a_stale_index_goes_when_old_and_a_young_one_stays(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    stale = write_audio_file(store, DS, "a" * 32, [rows_table([("a/0", "a")])])
    store.delete(stale.path)  # its file collected or lost: a run finding the index measures afresh
    _age(tmp_path)
    young = write_audio_file(store, DS, "b" * 32, [rows_table([("a/1", "a")])])
    store.delete(young.path)

    report = collect_garbage(store, DS, DAY)
    assert [(p.kind, p.objects) for p in report.removed] == [("audio", 1)]
    assert _audio_keys(store) == {clip_index_key(DS, "b" * 32)}


def test_an_old_unindexed_retry_goes_and_the_referenced_file_and_its_index_stay(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    table = rows_table([("a/0", "a"), ("a/1", "a")])
    key = clip_key_of(DS, "run-1", 0)
    retry = write_audio_file(store, DS, key, [table.slice(0, 1)])  # an earlier attempt, other bytes
    manifest = commit_split(store, DS, "run-1", [table])  # rewrites the index: it names the new file
    kept = manifest.shards[0].audio
    assert kept is not None and retry.path != kept.path
    _age(tmp_path)

    report = collect_garbage(store, DS, DAY)
    [entry] = [p for p in report.removed if p.kind == "audio"]
    assert (entry.objects, entry.bytes) == (1, retry.bytes)
    assert _audio_keys(store) == {kept.path, clip_index_key(DS, key)}
    assert verify_version(store, DS, "v0001").ok


def test_real_runs_sharing_audio_files_keep_them_through_gc(tmp_path: Path) -> None:
    """The pipeline's own markers and manifests: a re-run that changes only the LLM reuses the first
    run's audio files; both runs' markers claim them, both versions list them, gc keeps them."""
    root = tmp_path / "root"
    v1 = make_version(str(root), DS, workdir=tmp_path, shard_size=4)
    v2 = make_version(str(root), DS, workdir=tmp_path, shard_size=4, overrides=["llm.temperature=0.3"])
    audio = [s.audio.path for s in v1.shards if s.audio is not None]
    assert len(audio) == len(v1.shards) and audio == [s.audio.path for s in v2.shards if s.audio is not None]
    store = LocalStore(root)

    dry = collect_garbage(store, DS, DAY, dry_run=True)
    assert dry.removed == [] and dry.referenced_audio == len(audio)  # claimed by markers and manifests
    report = collect_garbage(store, DS, 0.0, now=time.time() + 365 * DAY)
    assert sorted(p.kind for p in report.removed) == ["staging", "staging"]
    assert {k for k in _audio_keys(store) if k.endswith(".parquet")} == set(audio)
    assert verify_version(store, DS, v1.lineage.version).ok and verify_version(store, DS, v2.lineage.version).ok


def test_a_scan_lists_other_datasets_only_by_their_version_prefixes(tmp_path: Path) -> None:
    """Finding what the committed manifests reference costs the root's versions, not its shards:
    gc of A never lists the root whole, nor another dataset's data, audio or staging."""
    store = LocalStore(tmp_path)
    commit_split(store, "A", "run-a", [rows_table([("a/0", "a")])])
    other = commit_split(store, "B", "run-b", [rows_table([("b/0", "b"), ("b/1", "b")])])
    write_split_shard(store, "A", "run-old", 0, rows_table([("a/9", "a")]))  # A's garbage: makes gc look
    _age(tmp_path)
    listed: list[str] = []
    real = store.list_info

    def spy(prefix: str) -> Any:
        listed.append(prefix)
        return real(prefix)

    store.list_info = spy  # type: ignore[method-assign]
    report = collect_garbage(store, "A", DAY)
    assert any(p.kind == "audio" for p in report.removed)  # run-old's audio file: nothing lists it
    assert "" not in listed and [p for p in listed if p.startswith("B/")] and \
        all(p == "B/v" for p in listed if p.startswith("B/"))
    assert all(store.exists(s.audio.path) for s in other.shards if s.audio)  # B's audio untouched
