"""Compose and `output.base` with versions whose audio is stored once: the new manifest names each
shard's audio file as its source did (a filtered copy too), readers get every row's own audio bytes,
verify and gc agree, and diff and the card count the shared audio files."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from storage.compose import compose_version, load_part, on_base
from storage.diff import diff_versions
from storage.gc import collect_garbage
from storage.objectstore import LocalStore
from storage.reader import open_dataset
from storage.verify import verify_version
from storage.versions import file_key, read_manifest, ref_key
from tests.support.compose_support import (
    commit_shards,
    commit_split,
    commit_tables,
    rows_table,
    write_split_shard,
)

DAY = 86_400.0


def _audio_by_id(*tables: pa.Table) -> dict[str, bytes]:
    return {r["id"]: r["audio"]["bytes"] for t in tables for r in t.select(["id", "audio"]).to_pylist()}


def _read_audio(root: Path, uri: str) -> dict[str, bytes]:
    """Every row's audio bytes as the reader returns them (joined from the audio files)."""
    rows = open_dataset(f"{root}/{uri}").to_arrow(["id", "audio"]).to_pylist()
    return {r["id"]: r["audio"]["bytes"] for r in rows}


def test_compose_carries_audio_files_and_a_filtered_shard_keeps_its_own(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    a0, a1 = rows_table([("a/0", "a"), ("a/1", "a")], "ra"), rows_table([("a/2", "a")], "ra")
    late = rows_table([("a/q", "a")], "ra")  # only in A's audio file (quarantined at the LLM stage)
    a = commit_split(store, "A", "run-a", [a0, a1], extras=[late, None])
    b0 = rows_table([("b/0", "b"), ("b/1", "b")], "rb")
    commit_tables(store, "B", "run-b", [b0], layout1=True)  # before audio files: bytes in its rows
    mixed = rows_table([("m/0", "a"), ("m/1", "b"), ("m/2", "a")], "rm")
    m = commit_split(store, "M", "run-m", [mixed])

    parts = [load_part(store, n, "v0001") for n in ("A", "B", "M")]
    c = compose_version(store, "C", parts, exclude=["b"], code_version="test")
    assert [s.audio for s in c.shards[:2]] == [s.audio for s in a.shards]  # referenced as they are
    assert c.shards[2].path.startswith("C/data/compose-") and c.shards[2].rows == 2  # m/1 filtered out
    assert c.shards[2].audio == m.shards[0].audio  # the filtered copy names the same audio file
    assert not list(store.list("C/audio/"))  # no audio written or copied

    want = _audio_by_id(a0, a1, mixed)
    del want["m/1"]
    assert _read_audio(tmp_path, "C") == want
    report = verify_version(store, "C", "v0001")
    assert report.ok and report.audio_files_checked == 3, report.summary()

    c2 = compose_version(store, "C2", parts, code_version="test")  # nothing excluded: B's rows as they are
    assert [s.audio for s in c2.shards] == [*(s.audio for s in a.shards), None, m.shards[0].audio]
    assert _read_audio(tmp_path, "C2") == _audio_by_id(a0, a1, b0, mixed)

    # The sources' refs gone, every run's staging collected: C still reads, nothing it names went.
    for name in ("A", "B", "M"):
        store.delete(ref_key(name, "latest"))
    for name in ("A", "B", "M", "C", "C2"):
        collect_garbage(store, name, 0.0, now=time.time() + 365 * DAY)
    assert all(store.exists(s.audio.path) for s in c.shards if s.audio is not None)
    assert verify_version(store, "C", "v0001").ok and _read_audio(tmp_path, "C") == want


def test_on_base_keeps_the_base_audio_files_and_adds_the_runs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    mixed = rows_table([("m/0", "a"), ("m/1", "b")], "rm")
    base = commit_split(store, "M", "run-m", [mixed])
    fresh = rows_table([("m/1", "b"), ("n/1", "b")], "rn")  # corpus b measured again by the new run
    new = [write_split_shard(store, "M", "run-n", 0, fresh)]

    selection = on_base(store, load_part(store, "M", "v0001"), new, target="M", run_id="run-n")
    assert selection.rewritten == 1 and selection.shards[0].audio == base.shards[0].audio
    v2 = commit_shards(store, "M", "run-n", [*selection.shards, *new], [mixed.slice(0, 1), fresh])
    assert [s.audio for s in v2.shards] == [base.shards[0].audio, new[0].audio]
    assert _read_audio(tmp_path, "M@v0002") == {**_audio_by_id(mixed.slice(0, 1)), **_audio_by_id(fresh)}
    assert verify_version(store, "M", "v0002").ok


def test_diff_and_card_count_shared_audio_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    table = rows_table([("a/0", "a"), ("a/1", "a")], "r1")
    v1 = commit_split(store, "A", "run-1", [table])
    audio = v1.shards[0].audio
    assert audio is not None
    # A re-run that changed only the LLM: new rows, the same audio file (a clip-cache hit).
    v2 = commit_shards(store, "A", "run-2", [write_split_shard(store, "A", "run-2", 0, table, audio=audio)], [table])

    text = diff_versions(v1, v2)
    assert f"shared audio files: 1 ({audio.bytes:,} bytes); only in A@v0001: 0 (0 bytes); only in A@v0002: 0 " \
           "(0 bytes)" in text
    assert "shared shards: 0 (0 bytes)" in text
    b1, b2 = v1.shards[0].bytes + audio.bytes, v2.shards[0].bytes + audio.bytes
    assert f"bytes:        {b1:,} → {b2:,}" in text  # a version's bytes count its audio file

    card = store.get_bytes("A/v0002/README.md").decode()
    assert "| audio files | 1 |" in card and f"| bytes | {b2:,} |" in card
    assert f"| `{audio.path}` | {audio.rows:,} | {audio.bytes:,} | `{audio.sha256}` |" in card
    assert file_key(read_manifest(store, "A", "v0002"), audio) == audio.path


def test_a_version_without_audio_files_diffs_and_renders_as_before(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    v1 = commit_tables(store, "A", "run-1", [rows_table([("a/0", "a")])])
    v2 = commit_tables(store, "A", "run-2", [rows_table([("a/0", "a"), ("a/1", "a")])])
    text = diff_versions(v1, v2)
    assert "shared audio files" not in text
    assert f"bytes:        {v1.shards[0].bytes:,} → {v2.shards[0].bytes:,}" in text
    card = store.get_bytes("A/v0002/README.md").decode()
    assert "audio files" not in card.lower() and f"| bytes | {v2.shards[0].bytes:,} |" in card
