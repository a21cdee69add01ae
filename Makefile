# speechpairs: `make demo` runs the main job on embedded defaults, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch, always (README "Set-up"): a CPU wheel pip already sees through its find-links is
# taken without contacting anything else; otherwise torch alone comes from PyTorch's CPU wheel index.
# A mirror: `make setup TORCH_INDEX=https://mirror.example/whl/cpu`.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# `make serve`: the Prefect server's address (`make serve PORT=4300`).
HOST ?= 127.0.0.1
PORT ?= 4200
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK ?= 1
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: setup demo test test-fast bench lint clean system-deps serve torch-cpu

# Debian packages: espeak-ng + sox (synthetic test speech), ffmpeg (torchcodec decoding), libsndfile.
system-deps:
	@need=""; for c in espeak-ng sox ffmpeg; do command -v $$c >/dev/null || need=1; done; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox ffmpeg libsndfile1 >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox ffmpeg libsndfile1 >/dev/null; fi; fi

# torch alone, the CPU build, with --no-deps (its own small requirements come with the project
# below): first from a local wheel only (--no-index: pip's find-links, nothing contacted), else from
# TORCH_INDEX. `2.13.0+cpu` sorts above PyPI's CUDA `2.13.0`, so an extra index in pip's config cannot win.
torch-cpu:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -m pip install -q --no-index --no-deps 'torch==$(TORCH_VERSION)+cpu' 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION)+cpu: already installed, or a local wheel (pip's find-links)"; \
	else \
	  echo "torch $(TORCH_VERSION): the CPU build from $(TORCH_INDEX)"; \
	  $(PY) -m pip install -q --no-deps --index-url '$(TORCH_INDEX)' 'torch==$(TORCH_VERSION)'; \
	fi

# Then the project, with torch pinned to the build just installed (nothing may replace it). The
# `models-cpu` extra is `models` without openai-whisper, which comes after with --no-deps: it requires
# triton on Linux x86_64, used only by its CUDA kernels. No nvidia-*/cuda-*/triton may end up here.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(MAKE) --no-print-directory torch-cpu VENV=$(VENV)
	$(PY) -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c constraints.txt -c $(VENV)/torch-pin.txt -e '.[dev,models-cpu,distributed]'
	$(PY) -m pip install -q --no-deps -c constraints.txt openai-whisper
	@cuda="$$($(PY) -m pip list --format=freeze | grep -iE '^(nvidia-|cuda-|triton==)')"; \
	if [ -n "$$cuda" ]; then echo "CUDA packages in $(VENV) (this set-up is CPU only; rm -rf $(VENV) and" \
	  "run make setup again):" $$cuda >&2; exit 1; fi
	@touch $(STAMP)

setup: system-deps $(STAMP)

demo: setup
	$(VENV)/bin/speechpairs run examples/quickstart.yaml

# Everything (CI calls this): tests/unit (plain functions, local files) and tests/integration (real
# SeaweedFS, the Prefect API, clusters, subprocess CLIs, kill -9). `make test-fast`: the unit layer only.
test: setup  # everything: the unit layer without S3 on every core, then its S3 cases, then integration
	$(PY) -m pytest -q -n auto -m "not s3" tests/unit
	$(PY) -m pytest -q -m s3 tests/unit
	$(PY) -m pytest -q tests/integration

test-fast: setup
	$(PY) -m pytest -q -n auto -m "not s3" tests/unit

bench: setup
	$(PY) bench/features.py
	$(PY) bench/pipeline.py
	$(PY) bench/read.py
	$(PY) bench/models.py
	$(PY) bench/llm.py
	$(PY) bench/scale.py
	$(PY) bench/cli.py
	$(PY) bench/longform.py

# The service stack: a Prefect server (SQLite under .prefect) on HOST:PORT, the work pool, the
# deployments and a process worker; refuses a port already taken; Ctrl-C stops all of it (flows/serve.py).
serve: setup
	$(PY) -m flows.serve --host $(HOST) --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check flows tasks schemas storage tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf data .prefect .pytest_cache
