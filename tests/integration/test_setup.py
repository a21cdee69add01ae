"""`make setup` builds a CPU-only environment: CPU torch, no nvidia-*/cuda-*/triton, Whisper without triton.

The torch step (`make torch-cpu`) is run for real in a throwaway venv, against a local wheel through
pip's find-links and against a file:// mirror standing in for PyTorch's CPU index: nothing but local
files is contacted.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.paths import REPO

CUDA_DIST = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
# The GPU image (Dockerfile `gpu` stage) sets this: CUDA packages are meant to be there. Anywhere else a
# CUDA torch is exactly the set-up mistake these tests exist to catch, so they never skip on their own.
cpu_setup_only = pytest.mark.skipif(os.environ.get("SPEECHPAIRS_GPU_IMAGE") == "1",
                                    reason="the GPU image carries CUDA torch and triton by design")


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name} \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert m, f"Makefile sets no {name}"
    return m.group(1)


def _extras() -> dict[str, list[Requirement]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {k: [Requirement(r) for r in v] for k, v in data["project"]["optional-dependencies"].items()}


@cpu_setup_only
def test_no_cuda_packages_in_this_environment() -> None:
    names = sorted({canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()})
    assert len(names) > 50, names  # the listing works: the project's environment has many
    cuda = [n for n in names if CUDA_DIST.match(n)]
    assert not cuda, f"CUDA packages in a CPU set-up: {cuda} (rm -rf .venv && make setup)"


@cpu_setup_only
def test_torch_is_the_pinned_cpu_build() -> None:
    version = importlib.metadata.version("torch")
    expected = _makefile_var("TORCH_VERSION")
    assert version == f"{expected}+cpu" or (sys.platform == "darwin" and version == expected), version
    requires = importlib.metadata.requires("torch") or []
    assert not [r for r in requires if CUDA_DIST.match(canonicalize_name(Requirement(r).name))], requires


def test_whisper_works_without_triton() -> None:
    """Whisper's triton kernels serve CUDA tensors only; on CPU its timing code uses numba."""
    assert importlib.util.find_spec("triton") is None
    import numpy as np
    import torch
    import whisper
    from whisper.timing import dtw, median_filter

    assert callable(whisper.load_model)
    cost = np.array([[0, 9, 9], [9, 0, 9], [9, 9, 0], [9, 9, 0]], dtype=np.float32)
    text_idx, time_idx = dtw(torch.from_numpy(cost))  # CPU tensor → numba's dtw_cpu
    assert text_idx.tolist() == [0, 1, 2, 3] and time_idx.tolist() == [0, 1, 2, 2]  # the zero-cost diagonal
    x = torch.tensor([[[1.0, 1.0, 5.0, 1.0, 1.0, 2.0, 2.0]]])  # CPU: torch's unfold, not the triton kernel
    assert median_filter(x, 3).flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]


def test_models_extra_is_models_cpu_plus_whisper() -> None:
    extras = _extras()
    models = {canonicalize_name(r.name): r for r in extras["models"]}
    assert set(models) == {"speechpairs", "openai-whisper"}
    assert models["speechpairs"].extras == {"models-cpu"}
    assert "openai-whisper" not in {canonicalize_name(r.name) for r in extras["models-cpu"]}


def test_models_cpu_lists_whisper_requirements_except_triton() -> None:
    """openai-whisper is installed with --no-deps: every other requirement of it must come from the
    core dependencies or `models-cpu`, and be installed here."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    ours = {canonicalize_name(Requirement(r).name) for r in data["project"]["dependencies"]}
    ours |= {canonicalize_name(r.name) for r in _extras()["models-cpu"]}
    env = default_environment() | {"extra": ""}
    needed = set()
    for raw in importlib.metadata.requires("openai-whisper") or []:
        req = Requirement(raw)
        if req.marker is None or req.marker.evaluate(env):
            needed.add(canonicalize_name(req.name))
    assert "torch" in needed and "numba" in needed
    missing = needed - ours - {"triton"}
    assert not missing, f"openai-whisper needs {sorted(missing)}: add them to the models-cpu extra"
    for name in needed - {"triton"}:
        importlib.metadata.version(name)  # installed (PackageNotFoundError otherwise)


def _dry_run(target: str, **variables: str) -> str:
    args = [f"{k}={v}" for k, v in variables.items()]
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-B", target, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_setup_installs_torch_first_then_the_project_then_whisper_without_deps(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    out = _dry_run(f"{venv}/.installed", VENV=str(venv))
    lines = out.splitlines()

    def first(pattern: str) -> int:
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert hits, f"no line matches {pattern!r} in:\n{out}"
        return hits[0]

    version = _makefile_var("TORCH_VERSION")
    local = first(rf"pip install -q --no-index --no-deps 'torch=={re.escape(version)}\+cpu'")
    index = first(r"pip install -q --no-deps --index-url 'https://download\.pytorch\.org/whl/cpu' "
                  rf"'torch=={re.escape(version)}'")
    project = first(r"pip install -q -c constraints\.txt -c \S+/torch-pin\.txt -e '\.\[dev,models-cpu,distributed\]'")
    whisper = first(r"pip install -q --no-deps -c constraints\.txt openai-whisper")
    check = first(r"grep -iE '\^\(nvidia-\|cuda-\|triton==\)'")
    assert local <= index < project < whisper < check
    assert not re.search(r"\[[^\]]*\bmodels(?![\w-])", out), "make setup must not install the `models` extra"


def test_torch_index_is_a_make_variable() -> None:
    out = _dry_run("torch-cpu", VENV="/nonexistent/venv", TORCH_INDEX="https://mirror.example/whl/cpu")
    assert "--index-url 'https://mirror.example/whl/cpu'" in out
    assert "download.pytorch.org" not in out


def _pip_env(**extra: str) -> dict[str, str]:
    """No pip configuration at all (PIP_CONFIG_FILE=/dev/null skips every config file), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


@pytest.mark.slow
def test_torch_step_takes_a_local_wheel_else_the_index(tmp_path: Path) -> None:
    version = _makefile_var("TORCH_VERSION")
    wheels = sorted(Path("/opt/wheels").glob(f"torch-{version}+cpu-*.whl")) if Path("/opt/wheels").is_dir() else []
    wheel = next((w for w in wheels if f"cp{sys.version_info.major}{sys.version_info.minor}" in w.name), None)
    if wheel is None:
        pytest.skip(f"no local torch {version}+cpu wheel for this Python under /opt/wheels")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    links = tmp_path / "links"
    links.mkdir()
    (links / wheel.name).symlink_to(wheel)

    def make(env: dict[str, str], index: str) -> str:
        proc = subprocess.run(["make", "--no-print-directory", "torch-cpu", f"VENV={venv}", f"TORCH_INDEX={index}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def installed() -> str:
        return subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import importlib.metadata as m; print(m.version('torch'))"],
                              capture_output=True, text=True, check=True, timeout=60).stdout.strip()

    # 1. A CPU wheel in find-links: taken with --no-index; the index (a closed port) is never asked.
    out = make(_pip_env(PIP_FIND_LINKS=str(links)), "http://127.0.0.1:9/simple")
    assert "local wheel" in out and "127.0.0.1:9" not in out
    assert installed() == f"{version}+cpu"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torch"], check=True,
                   timeout=120, env=_pip_env())

    # 2. No local wheel: torch alone from TORCH_INDEX (a file:// mirror of PyTorch's CPU index).
    simple = tmp_path / "simple" / "torch"
    simple.mkdir(parents=True)
    (simple / "index.html").write_text(f'<html><body><a href="{wheel.as_uri()}">{wheel.name}</a></body></html>')
    out = make(_pip_env(), (tmp_path / "simple").as_uri())
    assert f"the CPU build from {(tmp_path / 'simple').as_uri()}" in out
    assert installed() == f"{version}+cpu"
    site = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], env=_pip_env(),
                          capture_output=True, text=True, check=True, timeout=60).stdout
    assert [line.split("==")[0] for line in site.splitlines() if line.lower().startswith("torch")] == ["torch"]
    assert not re.search(r"(?im)^(nvidia-|cuda-|triton==)", site)
