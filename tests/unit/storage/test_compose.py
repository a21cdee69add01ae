"""Versions built from versions (storage/compose.py) on a local root: a composed manifest references
its sources' shards (layout 1 and 2) without copying them, duplicate ids fail naming both sources,
an excluded corpus drops whole shards and rewrites mixed ones once, and gc keeps every referenced
object even once the sources' refs are gone."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flows.cli import main
from schemas.arrow import ROW_SCHEMA, schema_to_b64
from schemas.manifest import Stats
from storage.compose import ComposeError, Part, common_schema, compose_version, load_part, on_base
from storage.diff import diff_versions
from storage.export import Desta2Format, export_version
from storage.gc import collect_garbage
from storage.objectstore import LocalStore
from storage.pull import pull_version
from storage.reader import open_dataset
from storage.verify import verify_version
from storage.versions import file_key, list_versions, read_manifest, ref_key
from tests.support.compose_support import commit_tables, rows_table, table_stats

DAY = 86_400.0


def _ab(store: LocalStore) -> tuple[pa.Table, pa.Table, pa.Table]:
    """A@v0001 (layout 2, two shards of corpus a) and B@v0001 (layout 1, corpus b)."""
    a0 = rows_table([("a/0", "a"), ("a/1", "a")], "ra")
    a1 = rows_table([("a/2", "a")], "ra")
    b0 = rows_table([("b/0", "b"), ("b/1", "b"), ("b/2", "b")], "rb")
    assert commit_tables(store, "A", "run-a", [a0, a1]).layout == 2
    commit_tables(store, "B", "run-b", [b0], layout1=True)
    assert read_manifest(store, "B", "v0001").layout == 1
    return a0, a1, b0


def _same_stats(got: Stats, want: Stats) -> None:
    """Equal, hours to the rounding of summed per-version figures."""
    assert got.audio_hours == pytest.approx(want.audio_hours, abs=3e-6)
    assert got.model_copy(update={"audio_hours": 0.0}) == want.model_copy(update={"audio_hours": 0.0})


def _ids(root: Path, uri: str) -> list[str]:
    return sorted(open_dataset(f"{root}/{uri}").to_arrow(["id"]).column("id").to_pylist())


def test_compose_references_both_layouts_without_copying(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    a0, a1, b0 = _ab(store)
    before = set(store.list(""))
    parts = [load_part(store, "A", "latest"), load_part(store, "B", "v0001")]
    c = compose_version(store, "C", parts, code_version="test")

    assert (c.lineage.version, c.layout, c.lineage.parents) == ("v0001", 2, ["A@v0001", "B@v0001"])
    expected = [file_key(p.manifest, s) for p in parts for s in p.manifest.shards]
    assert [s.path for s in c.shards] == expected and expected[2] == "B/v0001/data/train-00000-of-00001.parquet"
    assert [s.sha256 for s in c.shards] == [s.sha256 for p in parts for s in p.manifest.shards]
    written = set(store.list("")) - before
    assert all(k.startswith(("C/v0001/", "C/refs/")) for k in written), written  # no data bytes written
    assert "| built from | A@v0001, B@v0001 |" in store.get_bytes("C/v0001/README.md").decode()  # the card says so
    _same_stats(c.stats, table_stats([a0, a1, b0]))
    assert verify_version(store, "C", "v0001").ok
    assert _ids(tmp_path, "C") == ["a/0", "a/1", "a/2", "b/0", "b/1", "b/2"]
    assert export_version(store, "C", "v0001", tmp_path / "export", Desta2Format()).rows == 6
    pulled = pull_version(store, "C", "v0001", tmp_path / "pulled")  # a self-contained layout-1 copy
    assert len([p for p in pulled.downloaded if p.endswith(".parquet")]) == 3


def test_duplicate_ids_fail_naming_both_sources_and_commit_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _ab(store)
    commit_tables(store, "D", "run-d", [rows_table([("d/0", "d"), ("b/1", "d")])])
    parts = [load_part(store, "B", "v0001"), load_part(store, "D", "v0001")]
    d_key = read_manifest(store, "D", "v0001").shards[0].path
    with pytest.raises(ComposeError) as err:
        compose_version(store, "C", parts, code_version="test")
    assert str(err.value).startswith("duplicate row id 'b/1': in B@v0001 B/v0001/data/train-00000-of-00001.parquet "
                                     f"and in D@v0001 {d_key};")
    assert list_versions(store, "C") == [] and not list(store.list("C/data/"))


def test_exclude_dataset_drops_whole_shards_and_rewrites_a_mixed_one_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    a0, a1, b0 = _ab(store)
    mixed = rows_table([("m/0", "a"), ("m/1", "b"), ("m/2", "a"), ("m/3", "b")], "rm")
    commit_tables(store, "M", "run-m", [mixed])
    parts = [load_part(store, n, "latest") for n in ("A", "B", "M")]
    c = compose_version(store, "C", parts, exclude=["b"], code_version="test")

    rewritten = list(store.list("C/data/"))
    assert len(rewritten) == 1 and rewritten[0].startswith("C/data/compose-")  # the only bytes compose wrote
    assert [s.path for s in c.shards][:2] == [s.path for s in parts[0].manifest.shards]  # A's as they are
    assert c.shards[2].path == rewritten[0] and c.shards[2].rows == 2 and len(c.shards) == 3  # B left out
    kept = mixed.filter(pc.equal(mixed.column("dataset"), "a"))
    _same_stats(c.stats, table_stats([a0, a1, kept]))
    assert verify_version(store, "C", "v0001").ok
    assert _ids(tmp_path, "C") == ["a/0", "a/1", "a/2", "m/0", "m/2"]
    assert set(open_dataset(f"{tmp_path}/C").to_arrow(["dataset"]).column("dataset").to_pylist()) == {"a"}
    assert b0.num_rows == 3 and c.stats.rows == 5


def test_on_base_replaces_the_runs_corpus_and_names_a_duplicate_id(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _ab(store)
    commit_tables(store, "M", "run-m", [rows_table([("m/0", "a"), ("m/1", "b")])])
    base = load_part(store, "M", "v0001")
    new = commit_tables(store, "N", "run-n", [rows_table([("m/1", "b"), ("n/1", "b")])]).shards
    selection = on_base(store, base, new, target="M", run_id="run-n")  # corpus b replaced: m/1 is no conflict
    assert selection.rewritten == 1 and [s.rows for s in selection.shards] == [1]
    assert selection.shards[0].path.startswith("M/data/compose-run-n/train-00000-")
    assert set(selection.ids) == {"m/0", "m/1", "n/1"} and selection.excluded.rows == 1

    clash = commit_tables(store, "N", "run-n2", [rows_table([("m/0", "c")])]).shards
    with pytest.raises(ComposeError, match=rf"^duplicate row id 'm/0': in M@v0001 {base.manifest.shards[0].path} "
                                           rf"and in this run \(run-n2\) {clash[0].path};"):
        on_base(store, base, clash, target="M", run_id="run-n2")


def test_sources_of_another_row_schema_are_refused_naming_them(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _ab(store)
    a = load_part(store, "A", "v0001")
    old = ROW_SCHEMA.remove(ROW_SCHEMA.get_field_index("audio_offset_s"))
    b = Part("B@v0007", a.manifest.model_copy(update={"arrow_schema": schema_to_b64(old)}))
    assert common_schema([a, a]) == a.manifest.arrow_schema
    with pytest.raises(ComposeError, match=r"^B@v0007 has another row schema than A@v0001 \(differs .*columns"):
        common_schema([a, b])
    assert base64.b64decode(common_schema([a], expected=schema_to_b64(ROW_SCHEMA)))


def test_gc_never_removes_what_a_composed_version_references(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _ab(store)
    c = compose_version(store, "C", [load_part(store, "A", "v0001"), load_part(store, "B", "v0001")],
                        code_version="test")
    commit_tables(store, "A", "run-a2", [rows_table([("a/9", "a")], "ra2")])  # A's latest moves on
    orphan = commit_tables(store, "A", "run-a3", [rows_table([("a/8", "a")])]).shards[0].path
    (tmp_path / "A" / "v0003" / "manifest.json").unlink()  # as if run-a3 died before its manifest
    for name in ("A", "B"):
        store.delete(ref_key(name, "latest"))
    keys = [file_key(c, s) for s in c.shards]

    for name in ("A", "B", "C"):
        collect_garbage(store, name, 0.0, now=time.time() + 365 * DAY)
    assert not store.exists(orphan)  # gc did remove what nothing lists
    assert all(store.exists(k) for k in keys)
    assert verify_version(store, "C", "v0001").ok
    assert _ids(tmp_path, "C@v0001") == ["a/0", "a/1", "a/2", "b/0", "b/1", "b/2"]


def test_diff_counts_shared_shards(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _ab(store)
    a = read_manifest(store, "A", "v0001")
    c = compose_version(store, "C", [load_part(store, "A", "v0001"), load_part(store, "B", "v0001")],
                        code_version="test")
    text = diff_versions(a, c)
    a_bytes, b_bytes = sum(s.bytes for s in a.shards), c.shards[2].bytes
    assert f"shared shards: 2 ({a_bytes:,} bytes); only in A@v0001: 0 (0 bytes); only in C@v0001: 1 " \
           f"({b_bytes:,} bytes)" in text
    assert "parents: - → A@v0001, B@v0001" in text


def test_cli_compose_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(tmp_path / "root")
    _ab(store)
    root = tmp_path / "root"
    rc = main(["datasets", "compose", "C", "--from", f"{root}/A@v0001", "--from", f"{root}/B"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("composed C v0001 from A@v0001, B@v0001: 3 shards, 6 rows, 0 quarantined")

    rc = main(["datasets", "compose", "C", "--from", f"{root}/A", "--from", f"{root}/C"])
    assert rc == 1 and "compose failed: duplicate row id 'a/0': in A@v0001" in capsys.readouterr().err

    (tmp_path / "other").mkdir()
    rc = main(["datasets", "compose", "C", "--from", f"{root}/A", "--from", f"{tmp_path / 'other'}/B"])
    assert rc == 2 and "is on another root than" in capsys.readouterr().err
    rc = main(["datasets", "compose", "C", "--from", f"{root}/A@v0009"])
    assert rc == 2 and "no committed version 'v0009'" in capsys.readouterr().err
    assert list_versions(store, "C") == ["v0001"]
