"""Deploy through prefect.yaml to a real `prefect server start`, run it with a process worker."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.deploy import DEFAULT_POOL, PROJECT_DIR, DeployError, _flow_names, deploy, deployment_names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prefect_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
               PREFECT_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture
def prefect_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1 (SQLite in tmp), in its own process group."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = _prefect_env(home)
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        for key, value in env.items():
            if key.startswith("PREFECT_"):
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("PREFECT_API_URL", api)
        yield api
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        log.close()


def test_unknown_deployment_name_is_refused_before_contacting_a_server() -> None:
    assert deployment_names() == ["sample-nightly", "gc-daily", "calibrate-sample"]
    with pytest.raises(DeployError, match="no deployment named nope"):
        deploy(api_url="http://127.0.0.1:9/api", names=["nope"])


@pytest.mark.slow
def test_deploy_and_run_with_process_worker(prefect_server: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import StateType

    from storage.objectstore import open_store
    from storage.versions import resolve_version

    registered = deploy(api_url=prefect_server)
    assert registered[:2] == ["generate-dataset/sample-nightly", "gc-datasets/gc-daily"] and len(registered) == 3

    out_root = tmp_path / "out"
    with SyncPrefectClient(prefect_server) as client:
        pool = client.read_work_pool(DEFAULT_POOL)
        assert pool.type == "process"
        dep = client.read_deployment_by_name("generate-dataset/sample-nightly")
        assert dep.work_pool_name == DEFAULT_POOL
        assert {"speechpairs", "generate"} <= set(dep.tags)
        assert [getattr(s.schedule, "cron", None) for s in dep.schedules] == ["0 2 * * *"]
        schema = dep.parameter_openapi_schema or {}
        assert "config" in schema["properties"]  # typed form from RunConfig
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                   {"directory": str(PROJECT_DIR)}}]
        calibrate = client.read_deployment_by_name("calibrate-bins/calibrate-sample")
        assert calibrate.work_pool_name == DEFAULT_POOL and {"speechpairs", "calibrate"} <= set(calibrate.tags)
        assert not [s for s in calibrate.schedules if s.active]  # on demand only
        assert calibrate.parameters["params"]["output"] == "./data/bins/sample-calibrated.json"
        config = copy.deepcopy(dep.parameters["config"])
        config["output"]["root"] = str(out_root)
        run = client.create_flow_run_from_deployment(dep.id, parameters={"config": config})

    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", DEFAULT_POOL,
                             "--run-once", "--type", "process"],
                            check=False, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    with SyncPrefectClient(prefect_server) as client:
        finished = client.read_flow_run(run.id)
    assert finished.state is not None
    assert finished.state.type == StateType.COMPLETED, (
        f"flow run {finished.state.type}: {finished.state.message}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}")
    assert finished.name.startswith("generate-sample")
    assert resolve_version(open_store(str(out_root), None), "sample") == "v0001"
    # Re-deploying one deployment by name is idempotent (same deployment id).
    assert deploy(api_url=prefect_server, names=["sample-nightly"]) == ["generate-dataset/sample-nightly"]
    with SyncPrefectClient(prefect_server) as client:
        assert client.read_deployment_by_name("generate-dataset/sample-nightly").id == dep.id


def _env_without_api(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def test_deploy_without_an_api_exits_nonzero_and_starts_no_server(tmp_path: Path) -> None:
    """Without PREFECT_API_URL, `prefect deploy` would start a temporary server and register into a
    database thrown away at exit; `speechpairs deploy` refuses instead, naming the setting."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], cwd=PROJECT_DIR, env=_env_without_api(home),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < 60
    assert "no Prefect API to deploy to: PREFECT_API_URL is not set" in proc.stderr
    assert "make serve" in proc.stderr and "deployed" not in proc.stdout
    assert not list(home.rglob("*.db")), "a temporary Prefect server was started (its SQLite database is there)"


def test_deploy_to_an_api_that_does_not_answer_exits_nonzero(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = _env_without_api(home) | {"PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"no Prefect API answers at {env['PREFECT_API_URL']} (" in proc.stderr
    assert "nothing was deployed" in proc.stderr
    assert not list(home.rglob("*.db"))


def test_deploy_refuses_an_http_server_that_is_not_prefect() -> None:
    import http.server
    import threading

    from flows.deploy import ServerUnreachable

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello"  # 200, but not Prefect's JSON `true`
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        with pytest.raises(ServerUnreachable, match=r"an HTTP server that is not a Prefect API answers at .*"
                                                    r"not JSON.*nothing was deployed"):
            deploy(api_url=api)
    finally:
        server.shutdown()
        server.server_close()


def test_cli_deploy_refuses_an_unknown_deployment(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["deploy", "--name", "no-such-deployment"]) == 2
    assert "no deployment named no-such-deployment" in capsys.readouterr().err


def test_deployment_names_match_the_flows_they_run() -> None:
    """`deploy` derives flow names from entrypoints; each must be the real @flow name."""
    import importlib

    import yaml

    for d in yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())["deployments"]:
        path, func = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        assert _flow_names()[d["name"]] == f"{flow.name}/{d['name']}"
