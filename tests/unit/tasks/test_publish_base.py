"""`output.base` (tasks/publish.py): a run commits its new shards on top of a base version, adding a
corpus or replacing one corpus's rows, referencing the base's other shards, never copying them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from flows.generate import run_plain
from storage.objectstore import LocalStore
from storage.reader import open_dataset
from storage.verify import verify_version
from storage.versions import read_manifest
from tests.support.datasets_support import make_version, sample_config


def _corpora(root: Path, version: str) -> Counter[str]:
    return Counter(open_dataset(f"{root}/demo@{version}").to_arrow(["dataset"]).column("dataset").to_pylist())


def test_base_is_out_of_the_config_hash(tmp_path: Path) -> None:
    plain = sample_config(str(tmp_path), "demo", workdir=tmp_path)
    based = sample_config(str(tmp_path), "demo", workdir=tmp_path, overrides=["output.base=other@v0002"])
    assert based.output.base == "other@v0002" and plain.output.base is None
    assert based.config_hash() == plain.config_hash()  # shards are reused; old configs keep their hash


def test_base_adds_a_corpus_then_replaces_its_rows(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    v1 = make_version(str(root), "demo", workdir=tmp_path)
    assert (v1.lineage.version, v1.stats.rows) == ("v0001", 10)
    v1_keys = [s.path for s in v1.shards]

    def run(corpus: str, repeat: int) -> str:
        config = sample_config(str(root), "demo", workdir=tmp_path, repeat=repeat,
                               overrides=[f"sources.0.dataset={corpus}", "output.base=latest"])
        return run_plain(config).lineage.version

    assert run("other", 2) == "v0002"  # add a corpus
    v2 = read_manifest(store, "demo", "v0002")
    assert v2.lineage.parents == ["demo@v0001"] and v2.lineage.parent == "v0001"
    assert [s.path for s in v2.shards][:len(v1_keys)] == v1_keys  # referenced, not copied
    assert (v2.stats.rows, _corpora(root, "v0002")) == (30, Counter({"sample": 10, "other": 20}))
    assert v2.stats.clips_in == v1.stats.clips_in + 20
    assert verify_version(store, "demo", "v0002").ok

    assert run("other", 3) == "v0003"  # replace that corpus's rows (same ids as v0002's: no conflict)
    v3 = read_manifest(store, "demo", "v0003")
    assert [s.path for s in v3.shards][:len(v1_keys)] == v1_keys
    assert not {s.path for s in v2.shards[len(v1_keys):]} & {s.path for s in v3.shards}
    assert (v3.stats.rows, _corpora(root, "v0003")) == (40, Counter({"sample": 10, "other": 30}))
    counted: dict[str, Counter[str]] = {}  # the base's counts less the replaced rows' = the rows' own
    for attrs in open_dataset(f"{root}/demo@v0003").to_arrow(["attributes"]).column("attributes").to_pylist():
        for key, word in json.loads(attrs).items():
            counted.setdefault(key, Counter())[word] += 1
    assert v3.stats.attribute_counts and v3.stats.attribute_counts == {k: dict(v) for k, v in counted.items()}
    assert verify_version(store, "demo", "v0003").ok

    # A second base-less run of the same dataset holds only its own rows (the default is unchanged).
    plain = run_plain(sample_config(str(root), "demo", workdir=tmp_path, repeat=1,
                                    overrides=["sources.0.dataset=third"]))
    assert (plain.lineage.version, plain.lineage.parents, plain.stats.rows) == ("v0004", [], 10)
    assert _corpora(root, "v0004") == Counter({"third": 10})
