"""One run at a time: the staging lease, alone, and two `speechpairs run` launched at the same instant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from storage.gc import collect_garbage
from storage.layout import LEASE
from storage.lease import LeaseInfo, LeaseLost, RunBusy, RunLease, read_lease
from storage.objectstore import ObjectStore, open_store
from storage.reader import open_dataset
from tests.support.fake_llm_server import FakeLLMServer
from tests.support.paths import REPO
from tests.support.seaweedfs import SeaweedS3

SAMPLE = REPO / "examples" / "sample_corpus"
STAGING = "ds/_staging/run-x"


def _info(store: ObjectStore) -> LeaseInfo:
    found = read_lease(store, STAGING)
    assert found is not None
    return found


# ------------------------------------------------------------------------------------ the lease alone


def test_a_held_lease_turns_a_second_launch_away_naming_the_holder(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    with RunLease(store, STAGING, "run-x", ttl_s=30) as first:
        with pytest.raises(RunBusy) as busy:
            RunLease(store, STAGING, "run-x", ttl_s=30).acquire()
        text = str(busy.value)
        assert text.startswith("run run-x is in progress (started ") and f"pid {os.getpid()}" in text
        assert "output.when_running: wait" in text and busy.value.info.holder == first.info.holder
    assert read_lease(store, STAGING) is None  # released
    with RunLease(store, STAGING, "run-x", ttl_s=30):  # free again
        pass


def test_the_lease_is_renewed_while_held_and_taken_over_once_expired(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(str(tmp_path))
    lease = RunLease(store, STAGING, "run-x", ttl_s=0.6)
    lease.acquire()
    first_expiry = _info(store).expires_at
    time.sleep(1.5)  # past the first expiry: renewed every 0.2 s
    assert _info(store).expires_at > first_expiry and _info(store).expires_at > datetime.now(UTC)
    with pytest.raises(RunBusy):
        RunLease(store, STAGING, "run-x", ttl_s=0.6).acquire()
    # The holder dies: no more renewals (stop the thread without releasing), then the lease expires.
    lease._stop.set()
    assert lease._thread is not None
    lease._thread.join()
    time.sleep(0.8)
    taker = RunLease(store, STAGING, "run-x", ttl_s=30)
    taker.acquire()
    assert _info(store).holder == taker.info.holder and "took over the expired lease" in caplog.text
    with pytest.raises(LeaseLost):  # the dead holder, if it woke up, must not commit
        lease.check()
    taker.check()
    taker.release()


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    from storage.lease import _boot_id, _proc_start

    store = open_store(str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = _proc_start(child.pid)
    assert started is not None
    ours = LeaseInfo(holder="killed", host=__import__("socket").gethostname(), pid=child.pid,
                     started_at=datetime.now(UTC), expires_at=datetime.now(UTC) + timedelta(minutes=10),
                     boot_id=_boot_id(), proc_start=started)
    store.put_bytes(f"{STAGING}/{LEASE}", ours.model_dump_json().encode())
    with pytest.raises(RunBusy):  # its process is alive: the lease holds
        RunLease(store, STAGING, "run-x", ttl_s=30).acquire()
    child.kill()
    child.wait()
    with RunLease(store, STAGING, "run-x", ttl_s=30) as taker:  # killed: taken over without waiting 10 min
        assert _info(store).holder == taker.info.holder
    # Another machine's holder is never judged by our process table.
    elsewhere = ours.model_copy(update={"host": "another-host"})
    store.put_bytes(f"{STAGING}/{LEASE}", elsewhere.model_dump_json().encode())
    with pytest.raises(RunBusy):
        RunLease(store, STAGING, "run-x", ttl_s=30).acquire()


def test_a_lease_this_process_released_but_could_not_delete_is_taken_over(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(str(tmp_path))
    first = RunLease(store, STAGING, "run-x", ttl_s=30)
    first.acquire()

    def store_down(key: str) -> None:
        raise OSError("the store is down")

    monkeypatch.setattr(store, "delete", store_down)
    first.release()  # warns; the lease object stays behind, valid for 30 s
    assert _info(store).holder == first.info.holder
    monkeypatch.undo()
    with RunLease(store, STAGING, "run-x", ttl_s=30) as again:  # the same process re-running: no wait
        assert _info(store).holder == again.info.holder
        with pytest.raises(RunBusy):  # but a launch this process still runs is respected
            RunLease(store, STAGING, "run-x", ttl_s=30).acquire()


def test_an_unreadable_lease_is_replaced(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put_bytes(f"{STAGING}/{LEASE}", b"{not json")
    with RunLease(store, STAGING, "run-x", ttl_s=30) as lease:
        assert _info(store).holder == lease.info.holder


def test_a_waiting_launch_gets_the_lease_when_the_holder_finishes(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    holder = RunLease(store, STAGING, "run-x", ttl_s=30)
    holder.acquire()
    threading.Timer(1.0, holder.release).start()
    started = time.monotonic()
    with RunLease(store, STAGING, "run-x", ttl_s=30, wait=True, poll_s=0.1) as waiter:
        assert time.monotonic() - started >= 0.9 and _info(store).holder == waiter.info.holder


def test_gc_keeps_a_staging_area_whose_lease_is_live(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put_bytes(f"{STAGING}/plan.json", b"{}")
    live = LeaseInfo(holder="h", host="elsewhere", pid=1, started_at=datetime.now(UTC),
                     expires_at=datetime.now(UTC) + timedelta(minutes=5))
    store.put_bytes(f"{STAGING}/{LEASE}", live.model_dump_json().encode())
    report = collect_garbage(store, "ds", 0, now=time.time() + 60)
    assert report.removed == [] and store.exists(f"{STAGING}/plan.json")
    expired = live.model_copy(update={"expires_at": datetime.now(UTC) - timedelta(minutes=5)})
    store.put_bytes(f"{STAGING}/{LEASE}", expired.model_dump_json().encode())
    report = collect_garbage(store, "ds", 0, now=time.time() + 60)
    assert [p.prefix for p in report.removed] == [f"{STAGING}/"] and not store.exists(f"{STAGING}/plan.json")


# --------------------------------------------------------------- two real launches at the same instant


def _two_launches(tmp_path: Path, root: str, env: dict[str, str], when_running: str) -> list[tuple[int, str, str]]:
    manifest = tmp_path / "m.jsonl"
    with manifest.open("w") as f:
        for line in (SAMPLE / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rec["path"] = str(SAMPLE / rec["path"])
            rec["transcript"] = f"{rec.get('transcript') or ''} clip={rec['id']}".strip()
            f.write(json.dumps(rec) + "\n")
    server = FakeLLMServer(ok_delay_s=0.3).start()  # the run takes a few seconds: the launches overlap
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [{"path": str(manifest), "dataset": "s", "allowed_roots": [str(SAMPLE)]}],
        "output": {"root": root, "dataset": "lease", "shard_size": 4, "when_running": when_running, "lease_s": 10},
        "llm": {"backend": "openai", "base_url": server.base_url, "model": "fake-served-model", "concurrency": 2,
                "timeout_s": 30, "qc": {"min_words": 1}}}))
    try:
        cmd = [sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True) for _ in range(2)]  # the same instant
        results = []
        for p in procs:
            out, err = p.communicate(timeout=240)
            results.append((p.returncode, out.decode(), err.decode()))
    finally:
        server.stop()
    return results


def _env(tmp_path: Path, prefect_api: str) -> dict[str, str]:
    return dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "ph"),
                PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path))


def _check_one_version(store: ObjectStore, read_ids: list[str]) -> None:
    assert [k for k in store.list("lease/") if k.endswith("manifest.json")] == ["lease/v0001/manifest.json"]
    assert sorted(read_ids) == sorted(f"s/{json.loads(x)['id']}"
                                      for x in (SAMPLE / "manifest.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_two_launches_at_once_on_local_disk_one_runs_the_other_is_told(tmp_path: Path, prefect_api: str) -> None:
    results = _two_launches(tmp_path, str(tmp_path / "out"), _env(tmp_path, prefect_api), "fail")
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 75], results
    (busy,) = [err for rc, _, err in results if rc == 75]
    assert "is in progress (started " in busy and ", host " in busy and "Traceback" not in busy
    (ok,) = [out for rc, out, _ in results if rc == 0]
    assert "lease committed v0001" in ok
    store = open_store(str(tmp_path / "out"))
    _check_one_version(store, open_dataset(f"{tmp_path / 'out'}/lease@v0001").to_arrow(["id"]).column("id").to_pylist())


@pytest.mark.slow
def test_two_launches_at_once_with_wait_both_succeed_once(tmp_path: Path, prefect_api: str) -> None:
    results = _two_launches(tmp_path, str(tmp_path / "out"), _env(tmp_path, prefect_api), "wait")
    assert [rc for rc, _, _ in results] == [0, 0], results
    outs = sorted(out for _, out, _ in results)
    assert any("lease committed v0001" in o for o in outs) and any("already committed as v0001" in o for o in outs)
    store = open_store(str(tmp_path / "out"))
    _check_one_version(store, open_dataset(f"{tmp_path / 'out'}/lease@v0001").to_arrow(["id"]).column("id").to_pylist())


@pytest.mark.slow
@pytest.mark.s3
def test_two_launches_at_once_on_s3_one_runs_the_other_is_told(tmp_path: Path, prefect_api: str,
                                                               seaweedfs: SeaweedS3,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint_url)  # here and in the launches
    env = _env(tmp_path, prefect_api)
    root = seaweedfs.root(f"lease-{tmp_path.name}")
    results = _two_launches(tmp_path, root, env, "fail")
    assert sorted(rc for rc, _, _ in results) == [0, 75], results
    store = open_store(root)
    from storage.reader import open_dataset

    ids = open_dataset(f"{root}/lease").to_arrow(columns=["id"]).column("id").to_pylist()
    _check_one_version(store, ids)
