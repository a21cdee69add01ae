"""`speechpairs datasets …`: card, list, tag, show, verify, pull, diff, export desta and gc.

Versions are made by the real stages on the 10-clip sample corpus (tests/support/datasets_support.py),
on a local directory and on a real SeaweedFS S3 server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from flows.cli import main
from schemas.config import S3Config
from schemas.manifest import Manifest, Stats
from storage.card import render_card
from storage.export import AUDIO_MARKER
from storage.gc import collect_garbage
from storage.objectstore import LocalStore, ObjectStore, open_store
from storage.pull import PullError, local_manifest, pull_version
from storage.shards import write_parquet_shard
from storage.versions import commit_version, file_key, list_versions, read_manifest
from tests.support.datasets_support import make_version
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3

DS = "demo"
DAY = 86_400.0


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["datasets", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def card_header(text: str) -> dict:
    assert text.startswith("---\n")
    header, sep, _ = text[4:].partition("\n---\n")
    assert sep, "card has no closing '---' for its YAML header"
    return yaml.safe_load(header)


def flip_byte(data: bytes, at: int | None = None) -> bytes:
    i = len(data) // 2 if at is None else at
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local root with demo v0001 (10 rows) and v0002 (20 rows, another temperature). Read-only."""
    work = tmp_path_factory.mktemp("datasets-cli")
    root = work / "root"
    make_version(str(root), DS, workdir=work)
    make_version(str(root), DS, workdir=work, repeat=2, overrides=["llm.temperature=0.5"])
    return root


@pytest.fixture()
def root(versions: Path, tmp_path: Path) -> Path:
    """A private copy of `versions` that a test may change."""
    copy = tmp_path / "root"
    shutil.copytree(versions, copy)
    return copy


# --------------------------------------------------------------------------------------------
# dataset card
# --------------------------------------------------------------------------------------------


def test_committed_version_has_a_card_with_hf_yaml(versions: Path) -> None:
    import datasets
    from datasets.info import DatasetInfosDict

    store = LocalStore(versions)
    manifest = read_manifest(store, DS, "v0001")
    card = (versions / DS / "v0001" / "README.md").read_text()
    meta = card_header(card)
    config = meta["configs"][0]
    assert config["config_name"] == "default"
    # Layout 2: the card lists the shards' data keys relative to the version dir, in manifest order.
    assert config["data_files"] == [{"split": "train", "path": [f"../../{s.path}" for s in manifest.shards]}]
    assert all((versions / DS / "v0001" / p).resolve() == versions / file_key(manifest, s)
               for p, s in zip(config["data_files"][0]["path"], manifest.shards, strict=True))
    # Features in the card's list format, exactly as `datasets` writes and reads them.
    expected = datasets.Features.from_dict(manifest.hf_features)
    assert meta["dataset_info"]["features"] == expected._to_yaml_list()
    info = DatasetInfosDict.from_dataset_card_data(meta)["default"]
    assert info.features == expected and info.splits["train"].num_examples == 10
    assert meta["license"] == "other" and "licence" in card.lower()
    for text in ("| rows | 10 |", "| audio hours | 0.0111 |", "### Gender", "| Male | 9 | 90.0% |",
                 manifest.lineage.config_hash, manifest.lineage.run_id, manifest.lineage.bins_version,
                 "No clip was quarantined.", manifest.shards[0].sha256):
        assert text in card
    assert str(versions) not in card  # no store location in the card


def test_card_is_written_before_the_manifest(tmp_path: Path) -> None:
    import pyarrow as pa

    written: list[str] = []

    class Recording(LocalStore):
        fail_on: str | None = None

        def put_bytes(self, key: str, data: bytes, **kw: object) -> str:  # type: ignore[override]
            if key == self.fail_on:
                raise OSError("store went away")
            written.append(key)
            return super().put_bytes(key, data, **kw)  # type: ignore[arg-type]

    store = Recording(tmp_path / "root")
    lineage = {"run_id": "run-x", "code_version": "t", "config_hash": "c", "bins_version": "b",
               "prompt_pool_hash": "p", "sampling": {"temperature": 0.1, "api_key": "sk-not-for-cards"}}
    stats = Stats(clips_in=3, rows=2, quarantined=1, quarantine_by_reason={"too_short": 1})

    def commit() -> Manifest:
        shard = write_parquet_shard(store, f"{DS}/_staging/run-x/s.parquet", pa.table({"id": ["a", "b"]}))
        q = write_parquet_shard(store, f"{DS}/_staging/run-x/q.parquet", pa.table({"id": ["c"]}))
        return commit_version(store, dataset=DS, staged_shards=[shard], staged_quarantine=[q], lineage=lineage,
                              stats=stats, arrow_schema_b64="", hf_features={})

    store.fail_on = f"{DS}/v0001/manifest.json"  # dies right after the card: no visible version
    with pytest.raises(OSError):
        commit()
    assert list_versions(store, DS) == [] and (tmp_path / "root" / DS / "v0001" / "README.md").is_file()
    store.fail_on = None
    manifest = commit()
    assert manifest.lineage.version == "v0001"  # the run's own unfinished claim is taken up again
    card_writes = [i for i, k in enumerate(written) if k == f"{DS}/v0001/README.md"]
    assert len(card_writes) >= 2 and card_writes[-1] < written.index(f"{DS}/v0001/manifest.json")
    card = store.get_bytes(f"{DS}/v0001/README.md").decode()
    assert card == render_card(manifest)
    assert "| too_short | 1 |" in card and "quarantine/part-00000.parquet" in card
    assert "sk-not-for-cards" not in card and "api_key=***" in card and "temperature=0.1" in card
    assert "features" not in card_header(card)["dataset_info"]  # no HF features given: none claimed
    odd = render_card(manifest.model_copy(update={"hf_features": {"x": 5}}))  # never blocks a commit
    assert "features" not in card_header(odd)["dataset_info"]


# --------------------------------------------------------------------------------------------
# list / tag / show / diff / usage errors
# --------------------------------------------------------------------------------------------


def test_list_tag_and_show_by_tag(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "list", f"{root}/{DS}")
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {"v0001", "v0002"}
    assert lines["v0002"].split()[-1] == "latest" and " 20 " in lines["v0002"] and "0.0223" in lines["v0002"]

    rc, out, _ = cli(capsys, "tag", f"{root}/{DS}@v0001", "stable")
    assert rc == 0 and "v0001" in out
    rc, out, _ = cli(capsys, "show", f"{root}/{DS}@stable")
    assert rc == 0 and "version v0001" in out and "rows 10" in out
    rc, out, _ = cli(capsys, "list", f"{root}/{DS}")
    assert next(ln for ln in out.splitlines() if ln.startswith("v0001")).endswith("stable")
    # A tag moves anywhere (not only forward): point it at v0002, then back at v0001.
    assert cli(capsys, "tag", f"{root}/{DS}@latest", "stable")[0] == 0
    assert cli(capsys, "tag", f"{root}/{DS}@v0001", "stable")[0] == 0
    assert "version v0001" in cli(capsys, "show", f"{root}/{DS}@stable")[1]

    assert cli(capsys, "tag", f"{root}/{DS}@v0001", "v0009")[0] == 2  # a version name is no tag
    rc, _, err = cli(capsys, "tag", f"{root}/{DS}@v0042", "exp-x")
    assert rc == 2 and "v0042" in err


def test_diff_shows_row_and_lineage_changes(versions: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "diff", f"{versions}/{DS}@v0001", f"{versions}/{DS}@v0002")
    assert rc == 0
    assert "rows:         10 → 20 (+10)" in out
    assert "audio hours:  0.0111 → 0.0223 (+0.0111)" in out
    assert "sampling.temperature: 0.05 → 0.5" in out and "config_hash:" in out
    male = next(ln for ln in out.splitlines() if ln.strip().startswith("Male"))
    assert "9 ( 90.0%)" in male and "18 ( 90.0%)" in male and "+9" in male and "+0.0 pp" in male
    assert cli(capsys, "diff", f"{versions}/{DS}@v0001", "v0002")[1] == out  # short form, same dataset


def test_usage_errors_exit_2(versions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ("show", "no-slash"),
        ("verify", f"{versions}/{DS}@v0042"),
        ("pull", f"{versions}/{DS}@nosuchtag", str(tmp_path / "p")),
        ("export", "desta", f"{versions}/{DS}@v0042", str(tmp_path / "e")),
        ("list", f"{versions}/nothere"),
        ("list", f"{versions}/{DS}@v0001"),
        ("gc", f"{versions}/{DS}", "--older-than", "soon"),
        ("diff", f"{versions}/{DS}@v0001", f"{versions}/{DS}@v0099"),
    ]
    for args in cases:
        rc, _, err = cli(capsys, *args)
        assert rc == 2, args
        assert err.startswith("speechpairs: ") and "Traceback" not in err, args
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


# --------------------------------------------------------------------------------------------
# pull / verify
# --------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_is_verified_and_resumable(versions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "pulled"
    rc, out, err = cli(capsys, "pull", f"{versions}/{DS}@v0002", str(dest), "--progress")
    assert rc == 0 and "7 downloaded" in out and "0 already present" in out
    assert "100%" in err  # the byte progress bar
    stored = read_manifest(LocalStore(versions), DS, "v0002")
    # The shards are referenced at their data keys (layout 2): the pull is a self-contained layout-1 copy,
    # its shards joined with their audio files (audio stored once): their own checksums.
    manifest = Manifest.model_validate_json((dest / "manifest.json").read_bytes())
    assert stored.layout == 2 and manifest.layout == 1
    assert [s.path for s in manifest.shards] == [f"data/train-{i:05d}-of-00005.parquet" for i in range(5)]
    assert [s.path for s in manifest.shards] == [s.path for s in local_manifest(stored).shards]
    for shard in manifest.shards:
        assert _sha(dest / shard.path) == shard.sha256 and shard.audio is None
    assert [s.rows for s in manifest.shards] == [s.rows for s in stored.shards]
    assert (dest / "README.md").read_text() == render_card(manifest)
    assert not list(dest.rglob("*.part"))

    store = LocalStore(versions)
    again = pull_version(store, DS, "v0002", dest)
    assert again.downloaded == [] and again.bytes_downloaded == 0
    assert sorted(again.skipped) == sorted(["README.md", "manifest.json", *(s.path for s in manifest.shards)])

    victim = dest / manifest.shards[1].path
    victim.write_bytes(flip_byte(victim.read_bytes()))  # same size, other bytes
    (dest / manifest.shards[3].path).with_suffix(".parquet.part").write_bytes(b"half")  # a leftover
    third = pull_version(store, DS, "v0002", dest)
    assert third.downloaded == [manifest.shards[1].path]
    assert third.bytes_downloaded == stored.shards[1].bytes + stored.shards[1].audio.bytes  # type: ignore[union-attr]
    assert _sha(victim) == manifest.shards[1].sha256

    # The pulled directory is a dataset: `datasets` reads the card's configs.
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = datasets.load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 20 and isinstance(ds.features["audio"], datasets.Audio)


def test_corrupt_committed_shard_fails_verify_and_pull(root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "verify", f"{root}/{DS}@v0001")[0] == 0
    manifest = read_manifest(LocalStore(root), DS, "v0001")
    bad = manifest.shards[1].path
    path = root / file_key(manifest, manifest.shards[1])
    path.write_bytes(flip_byte(path.read_bytes()))

    rc, out, err = cli(capsys, "verify", f"{root}/{DS}@v0001")
    assert rc == 1 and f"{bad}: sha256 mismatch" in out and bad in err
    assert sum(bad in ln for ln in out.splitlines()) == 1  # only that shard is named
    rc, out, err = cli(capsys, "pull", f"{root}/{DS}@v0001", str(tmp_path / "p"))
    assert rc == 1 and bad in err and "corrupt" in err
    assert not (tmp_path / "p" / "manifest.json").exists() and not list((tmp_path / "p").rglob("*.part"))
    assert not (tmp_path / "p" / bad).exists()
    with pytest.raises(PullError, match=bad):
        pull_version(LocalStore(root), DS, "v0001", tmp_path / "p")


# --------------------------------------------------------------------------------------------
# export desta
# --------------------------------------------------------------------------------------------


def test_export_desta_layout(versions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "desta"
    rc, out, _ = cli(capsys, "export", "desta", f"{versions}/{DS}@v0001", str(dest))
    assert rc == 0 and "10 rows" in out
    manifest = read_manifest(LocalStore(versions), DS, "v0001")
    rows = {r["id"]: r for s in manifest.shards
            for r in pq.read_table(versions / file_key(manifest, s), columns=["id", "transcript", "duration_s", "response", "prompt"]).to_pylist()}
    lines = [json.loads(ln) for ln in (dest / f"{DS}.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and {ln["clip_id"] for ln in lines} == set(rows)
    for ln in lines:
        src = rows[ln["clip_id"]]
        assert {"id", "dataset", "seed_description", "prompt", "response", "messages"} <= set(ln)
        system, user = ln["messages"]  # input only: never an assistant turn
        assert system["role"] == "system" and "<start_audio>" in system["content"]
        assert user["role"] == "user" and user["content"] == f"{src['prompt']} <start_audio>{AUDIO_MARKER}<end_audio>"
        assert user["audios"] == [{"audio": ln["id"], "text": src["transcript"] or " "}]
        assert ln["response"] == src["response"]
        assert ln["id"] == f"audio/{ln['clip_id']}.flac" and not os.path.isabs(ln["id"])
        audio, sr = sf.read(dest / ln["id"], dtype="float32")
        assert sr == 16_000 and abs(len(audio) / sr - src["duration_s"]) < 0.01
    assert any(ln["messages"][1]["audios"][0]["text"].strip() for ln in lines)  # transcripts are carried
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(
        [f"{DS}.jsonl", *(ln["id"] for ln in lines)])


# --------------------------------------------------------------------------------------------
# gc
# --------------------------------------------------------------------------------------------


def _plant_uncommitted(store: ObjectStore, version: str) -> None:
    """What a publisher that died mid-commit leaves: claim, a copied shard, the card, no manifest."""
    store.put_bytes(f"{DS}/{version}/_claim", b'{"run_id": "run-dead"}', if_none_match=True)
    store.put_bytes(f"{DS}/{version}/data/train-00000-of-00001.parquet", b"PAR1 half a shard")
    store.put_bytes(f"{DS}/{version}/README.md", b"---\n---\n")


def test_gc_removes_old_garbage_never_a_committed_version(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(root)
    _plant_uncommitted(store, "v0003")
    old = time.time() - 2 * DAY
    for p in (root / DS).rglob("*"):
        os.utime(p, (old, old))  # everything (committed versions and refs included) is two days old
    store.put_bytes(f"{DS}/_staging/run-fresh/plan.json", b"{}")  # a run in progress: young
    staging_runs = sorted(p.name for p in (root / DS / "_staging").iterdir())
    assert len(staging_runs) == 3
    before = sorted(store.list(f"{DS}/"))

    rc, out, _ = cli(capsys, "gc", f"{root}/{DS}", "--older-than", "24h", "--dry-run")
    assert rc == 0 and "would remove 3 prefixes" in out and "v0003" in out
    assert sorted(store.list(f"{DS}/")) == before  # a dry run removes nothing

    rc, out, _ = cli(capsys, "gc", f"{root}/{DS}", "--older-than", "24h")
    assert rc == 0 and "removed 3 prefixes" in out and "2 committed versions untouched" in out
    audio = len({s.audio.path for v in ("v0001", "v0002") for s in read_manifest(store, DS, v).shards if s.audio})
    assert audio and f"{audio} audio files a version or live run references kept" in out
    after = sorted(store.list(f"{DS}/"))
    assert sorted(p.name for p in (root / DS / "_staging").iterdir()) == ["run-fresh"]
    assert [k for k in after if k.startswith(f"{DS}/v0003/")] == [f"{DS}/v0003/_claim"]  # tombstone stays
    assert [k for k in before if k.startswith((f"{DS}/v0001/", f"{DS}/v0002/", f"{DS}/refs/"))] == [
        k for k in after if k.startswith((f"{DS}/v0001/", f"{DS}/v0002/", f"{DS}/refs/"))]
    assert list_versions(store, DS) == ["v0001", "v0002"]
    assert cli(capsys, "verify", f"{root}/{DS}@v0001")[0] == 0 and cli(capsys, "verify", f"{root}/{DS}")[0] == 0
    # Nothing left to collect; a zero threshold still spares committed versions and refs.
    report = collect_garbage(store, DS, 0.0, now=time.time() + DAY)
    assert [p.prefix for p in report.removed] == [f"{DS}/_staging/run-fresh/"]
    assert list_versions(store, DS) == ["v0001", "v0002"] and store.exists(f"{DS}/refs/latest.json")


# --------------------------------------------------------------------------------------------
# the same on SeaweedFS
# --------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_list_verify_pull_corrupt_and_gc(seaweedfs: SeaweedS3, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    s3_root = seaweedfs.root(f"cli-{uuid.uuid4().hex[:10]}")
    make_version(s3_root, DS, workdir=tmp_path, s3_endpoint=seaweedfs.endpoint_url, s3_region=seaweedfs.region)
    opts = ["--s3-endpoint-url", seaweedfs.endpoint_url, "--s3-region", seaweedfs.region]
    store = open_store(s3_root, S3Config(endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region,
                                         addressing_style="path"))
    assert store.exists(f"{DS}/v0001/README.md")
    assert cli(capsys, "tag", f"{s3_root}/{DS}@v0001", "stable", *opts)[0] == 0

    rc, out, _ = cli(capsys, "list", f"{s3_root}/{DS}", *opts)
    assert rc == 0 and out.splitlines()[1].startswith("v0001") and out.splitlines()[1].endswith("latest, stable")
    rc, out, _ = cli(capsys, "verify", f"{s3_root}/{DS}@stable", *opts)
    assert rc == 0 and "OK" in out

    dest = tmp_path / "pulled"
    rc, out, _ = cli(capsys, "pull", f"{s3_root}/{DS}@v0001", str(dest), "--no-progress", *opts)
    assert rc == 0
    manifest = read_manifest(store, DS, "v0001")
    for shard in Manifest.model_validate_json((dest / "manifest.json").read_bytes()).shards:
        assert _sha(dest / shard.path) == shard.sha256
    assert card_header((dest / "README.md").read_text())["configs"][0]["data_files"][0]["path"] == "data/*.parquet"
    again = pull_version(store, DS, "v0001", dest)
    assert again.downloaded == [] and len(again.skipped) == len(manifest.shards) + 2

    rc, out, _ = cli(capsys, "export", "desta", f"{s3_root}/{DS}@v0001", str(tmp_path / "desta"), *opts)
    lines = (tmp_path / "desta" / f"{DS}.jsonl").read_text().splitlines()
    assert rc == 0 and len(lines) == 10
    assert all((tmp_path / "desta" / json.loads(ln)["id"]).is_file() for ln in lines)

    bad = manifest.shards[0].path
    key = file_key(manifest, manifest.shards[0])
    store.put_bytes(key, flip_byte(store.get_bytes(key)))
    rc, out, err = cli(capsys, "verify", f"{s3_root}/{DS}@v0001", *opts)
    assert rc == 1 and bad in out and bad in err
    rc, _, err = cli(capsys, "pull", f"{s3_root}/{DS}@v0001", str(tmp_path / "p2"), "--no-progress", *opts)
    assert rc == 1 and bad in err
    for text in (out, err):
        assert seaweedfs.secret_key not in text

    # gc: S3 timestamps cannot be set back, so look from two days ahead instead.
    _plant_uncommitted(store, "v0002")
    report = collect_garbage(store, DS, DAY, dry_run=True, now=time.time() + 2 * DAY)
    assert sorted(p.kind for p in report.removed) == ["staging", "uncommitted"]
    assert collect_garbage(store, DS, DAY).removed == []  # today nothing is old enough
    report = collect_garbage(store, DS, DAY, now=time.time() + 2 * DAY)
    assert sorted(p.kind for p in report.removed) == ["staging", "uncommitted"]
    assert f"{DS}/v0002/" in {p.prefix for p in report.removed}
    left = list(store.list(f"{DS}/"))
    assert not [k for k in left if "/_staging/" in k]
    assert [k for k in left if k.startswith(f"{DS}/v0002/")] == [f"{DS}/v0002/_claim"]
    assert list_versions(store, DS) == ["v0001"] and report.committed_versions == ["v0001"]
    assert store.exists(f"{DS}/refs/latest.json") and store.exists(f"{DS}/refs/stable.json")
    assert [k.rsplit("/", 1)[1] for k in left if k.startswith(f"{DS}/v0001/")] == [
        "README.md", "_claim", "config.yaml", "manifest.json"]  # the shards are referenced at their data keys
    assert all(store.exists(file_key(manifest, s)) for s in [*manifest.shards, *manifest.quarantine])


def test_cli_gives_the_temporary_prefect_server_time_to_start() -> None:
    """Prefect's 20 s default failed a first `make demo` on a fresh machine (database created and
    migrated on first start); a value the user set is kept."""
    import subprocess
    import sys

    probe = ("import sys; from flows.cli import main; main(['datasets', 'list', sys.argv[1]]); "
             "from prefect.settings import get_current_settings; "
             "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    repo = REPO

    def timeout_seen(env: dict[str, str]) -> str:
        out = subprocess.run([sys.executable, "-c", probe, str(repo / "examples")], capture_output=True,
                             text=True, cwd=repo, env=env, check=True)
        return out.stdout.strip().splitlines()[-1]

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    assert timeout_seen(env) == "120"
    assert timeout_seen({**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}) == "300"
