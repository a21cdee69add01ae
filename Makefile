# speechpairs: `make demo` runs the main job on embedded defaults, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: setup demo test bench lint clean system-deps serve

# Debian packages: espeak-ng + sox (synthetic test speech), ffmpeg (torchcodec decoding), libsndfile.
system-deps:
	@need=""; for c in espeak-ng sox ffmpeg; do command -v $$c >/dev/null || need=1; done; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox ffmpeg libsndfile1 >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox ffmpeg libsndfile1 >/dev/null; fi; fi

# torch goes in first, pinned, so nothing later pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,models,distributed]'
	@touch $(STAMP)

setup: system-deps $(STAMP)

demo: setup
	$(VENV)/bin/speechpairs run examples/quickstart.yaml

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/features.py
	$(PY) bench/pipeline.py
	$(PY) bench/read.py
	$(PY) bench/models.py
	$(PY) bench/llm.py
	$(PY) bench/scale.py

# A local Prefect server (SQLite under .prefect), the work pool, the deployments and a worker.
serve: setup
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200 & \
	until curl -sf http://127.0.0.1:4200/api/health >/dev/null; do sleep 1; done; \
	PREFECT_API_URL=http://127.0.0.1:4200/api $(VENV)/bin/speechpairs deploy && \
	PREFECT_API_URL=http://127.0.0.1:4200/api $(VENV)/bin/prefect worker start --pool speechpairs-process

lint: setup
	$(VENV)/bin/ruff check flows tasks schemas storage tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf data .prefect .pytest_cache
