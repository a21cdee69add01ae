"""Two processes publish the same dataset at the same moment on a real S3 server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from schemas.config import S3Config
from storage.objectstore import ObjectStore, open_store
from storage.versions import file_key, list_versions, read_manifest, resolve_version
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3

PUBLISHER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import tasks.publish as publish
    from flows.generate import run_plain
    from tests.support.datasets_support import sample_config
    root, endpoint, region, repeat, workdir, barrier = sys.argv[1:7]
    config = sample_config(root, "race", workdir=Path(workdir), repeat=int(repeat), shard_size=4,
                           s3_endpoint=endpoint, s3_region=region)
    commit = publish.commit_version

    def at_the_start_line(*args, **kwargs):
        # Both processes reach the commit, then start it at the same moment.
        Path(barrier, repeat).touch()
        while len(list(Path(barrier).iterdir())) < 2:
            time.sleep(0.001)
        return commit(*args, **kwargs)

    publish.commit_version = at_the_start_line
    print(json.dumps({{"version": run_plain(config).lineage.version}}))
""")


def _ids(store: ObjectStore, dataset: str, version: str) -> set[str]:
    manifest = read_manifest(store, dataset, version)
    ids: set[str] = set()
    for shard in manifest.shards:
        table = pq.read_table(io.BytesIO(store.get_bytes(file_key(manifest, shard))), columns=["id"])
        ids.update(table.column("id").to_pylist())
    assert len(ids) == manifest.stats.rows
    return ids


@pytest.mark.s3
def test_two_processes_publish_at_once(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    root = seaweedfs.root(f"race-{tmp_path.name}")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = []
    for repeat in (1, 2):
        work = tmp_path / f"w{repeat}"
        work.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-c", PUBLISHER.format(repo=str(REPO)), root, seaweedfs.endpoint_url,
             seaweedfs.region, str(repeat), str(work), str(barrier)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1])["version"])
    v_one, v_two = outs
    assert v_one != v_two
    store = open_store(root, S3Config(endpoint_url=seaweedfs.endpoint_url, region=seaweedfs.region))
    assert set(list_versions(store, "race")) == {v_one, v_two}
    assert resolve_version(store, "race", "latest") in {v_one, v_two}
    one, two = _ids(store, "race", v_one), _ids(store, "race", v_two)
    assert len(one) == 10 and len(two) == 20 and not one & two
    assert all("__r" not in i for i in one) and all("__r" in i for i in two)
