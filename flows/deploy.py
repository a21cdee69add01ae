"""Register the deployments in `prefect.yaml` with a Prefect server (what `speechpairs deploy` runs).

`deploy()` creates the process work pool if it is missing, then runs Prefect's own
`prefect --no-prompt deploy` on the project's `prefect.yaml`, so the file stays the single source
of truth (entrypoints, typed parameters, cron schedules, tags, pull step) and the CLI, `make serve`
and the tests register exactly the same deployments.

A server must answer first: without PREFECT_API_URL, `prefect deploy` would start a temporary server
of its own and register everything into a database that is thrown away when it exits.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_DIR / "prefect.yaml"
DEFAULT_POOL = "speechpairs-process"


class DeployError(RuntimeError):
    """The server could not be reached or `prefect deploy` failed (message carries its output)."""


class ServerUnreachable(DeployError):
    """No Prefect API answers where the deployments should go (nothing was registered)."""


def _get_json(url: str, timeout: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read(4096) or b"null")


def probe_api(api_url: str, timeout: float = 3.0) -> str | None:
    """None when a Prefect API answers at `api_url` (`/health` is true, `/version` a string); otherwise
    what answers there instead, in words, for an error message."""
    base = api_url.rstrip("/")
    try:
        health = _get_json(f"{base}/health", timeout)
        version = _get_json(f"{base}/version", timeout)
    except urllib.error.HTTPError as exc:
        return f"an HTTP server that is not a Prefect API answers {exc.url} with {exc.code} {exc.reason}"
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return f"an HTTP server that is not a Prefect API answers at {base} (its /health is not JSON)"
    except (OSError, http.client.HTTPException) as exc:  # refused, timed out, reset, not HTTP
        return f"no Prefect API answers at {base} ({getattr(exc, 'reason', None) or exc})"
    if health is not True or not isinstance(version, str):
        return f"an HTTP server that is not a Prefect API answers at {base} (/health: {str(health)[:60]!r})"
    return None


def require_api(api_url: str | None) -> str:
    """The API to deploy to (`api_url`, else the active profile's PREFECT_API_URL), checked to answer.
    Raises ServerUnreachable, naming the setting and the fix, when none is set or none answers."""
    if not api_url:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
    if not api_url:
        raise ServerUnreachable(
            "no Prefect API to deploy to: PREFECT_API_URL is not set (nor --api-url). Start the service "
            "with `make serve` (it deploys by itself), or point PREFECT_API_URL at a running server, e.g. "
            "PREFECT_API_URL=http://127.0.0.1:4200/api speechpairs deploy")
    problem = probe_api(api_url)
    if problem:
        raise ServerUnreachable(f"{problem}: start the Prefect server (`make serve`) or fix PREFECT_API_URL "
                                "/ --api-url; nothing was deployed")
    return str(api_url)


def deployment_names(path: Path = PREFECT_YAML) -> list[str]:
    """Deployment names declared in prefect.yaml, in file order."""
    data = yaml.safe_load(path.read_text()) or {}
    return [str(d["name"]) for d in data.get("deployments") or []]


def _flow_names(path: Path = PREFECT_YAML) -> dict[str, str]:
    """deployment name → '<flow name>/<deployment name>'.

    Every speechpairs flow is named after its function with hyphens (`calibrate_bins` →
    `calibrate-bins`, Prefect's own default), so the entrypoint gives the name without an import.
    """
    data = yaml.safe_load(path.read_text()) or {}
    return {str(d["name"]): f"{str(d['entrypoint']).rsplit(':', 1)[-1].replace('_', '-')}/{d['name']}"
            for d in data.get("deployments") or []}


def check_parameters(path: Path = PREFECT_YAML, names: list[str] | None = None) -> None:
    """Validate every deployment's `config` parameter as a RunConfig before it is registered: a bad
    key, or a secret inside a URL, is refused here (naming the deployment), not stored in the Prefect
    database and found at the first scheduled run."""
    from schemas.config import ConfigError, parse_config

    data = yaml.safe_load(path.read_text()) or {}
    for dep in data.get("deployments") or []:
        config = (dep.get("parameters") or {}).get("config")
        if config is None or (names is not None and dep.get("name") not in names):
            continue
        try:
            parse_config(config, environ={})
        except ConfigError as exc:
            raise DeployError(f"deployment {dep.get('name')!r} in {path}: {exc}") from None


def ensure_work_pool(api_url: str | None, pool: str = DEFAULT_POOL) -> bool:
    """Create a `process` work pool named `pool` unless it exists. True when it was created."""
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    client = SyncPrefectClient(api_url) if api_url else get_client(sync_client=True)
    with client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True


def _env(api_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env["PWD"] = str(PROJECT_DIR)  # prefect.yaml's pull step is `{{ $PWD }}`
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def deploy(api_url: str | None = None, pool: str = DEFAULT_POOL, names: list[str] | None = None,
           timeout: float = 300) -> list[str]:
    """Create the work pool if missing and register prefect.yaml's deployments (all, or `names`).

    `api_url` defaults to the active Prefect profile's PREFECT_API_URL; it must answer (ServerUnreachable
    otherwise). Returns the registered deployments as '<flow name>/<deployment name>'. Raises
    DeployError when `prefect deploy` fails.
    """
    declared = _flow_names()
    wanted = list(declared) if names is None else names
    unknown = [n for n in wanted if n not in declared]
    if unknown:
        raise DeployError(f"no deployment named {', '.join(unknown)} in {PREFECT_YAML} "
                          f"(declared: {', '.join(declared)})")
    check_parameters(names=wanted)
    api_url = require_api(api_url)
    ensure_work_pool(api_url, pool)
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    cmd += ["--all"] if names is None else [arg for n in wanted for arg in ("--name", n)]
    if pool != DEFAULT_POOL:
        cmd += ["--pool", pool]
    try:
        proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=_env(api_url), capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"`prefect deploy` did not finish in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise DeployError(f"`prefect deploy` failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return [declared[n] for n in wanted]
