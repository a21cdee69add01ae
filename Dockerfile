# speechpairs flow/worker images, two targets:
#   cpu (default: the last stage)   docker build -t speechpairs:cpu .
#   gpu (vLLM's official image)     docker build --target gpu -t speechpairs:gpu .
#                                   (--build-arg VLLM_IMAGE=vllm/vllm-openai:<tag> for another vLLM)
# Run a config:   docker run --rm -v "$PWD/data:/app/data" speechpairs:cpu run examples/quickstart.yaml
# Local stack (Prefect server on Postgres, SeaweedFS, worker): docker-compose.yml.
#
# The code lives at /app and is installed editable, so `speechpairs deploy` finds /app/prefect.yaml and
# registers deployments whose pull step (`{{ $PWD }}`) is /app: workers in either image run flows from /app.
# No Docker engine runs on the development machines: this file is kept correct by review and by
# tests/unit/test_container_files.py.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0

# ---------------------------------------------------------------------------------------------------
# gpu: vLLM's CUDA image (torch + vllm preinstalled), speechpairs on top; the image's torch/vllm stay.
# ---------------------------------------------------------------------------------------------------
FROM ${VLLM_IMAGE} AS gpu
# SPEECHPAIRS_GPU_IMAGE: CUDA torch and triton belong here; tests/integration/test_setup.py's CPU checks skip.
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    SPEECHPAIRS_GPU_IMAGE=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libsndfile1 ffmpeg espeak-ng sox \
 && rm -rf /var/lib/apt/lists/*
# uid 1000 may already belong to the base image's default user (e.g. `ubuntu`): take it over.
RUN existing="$(getent passwd 1000 | cut -d: -f1)"; \
    if [ -n "$existing" ]; then userdel --remove "$existing" 2>/dev/null || true; fi; \
    useradd --create-home --uid 1000 --user-group --shell /bin/bash speechpairs
WORKDIR /app
COPY pyproject.toml constraints.txt README.md prefect.yaml ./
COPY flows flows
COPY tasks tasks
COPY schemas schemas
COPY storage storage
COPY examples examples
# Pin every torch/vLLM-family package to the version the image ships, so pip keeps them
# (constraints.txt pins the CPU/py3.11 stack and does not apply here). vllm and torchaudio come in
# through the `gpu` extra, which puts vLLM's own requirements into the resolution. The last grep fails
# the build if any of the image's torch/vLLM packages was replaced anyway.
RUN python3 -m pip list --format=freeze \
      | grep -i -E '^(torch|vllm|triton|xformers|flashinfer)[a-z0-9_.-]*==' > /tmp/image-torch.txt \
 && cat /tmp/image-torch.txt \
 && python3 -m pip install -c /tmp/image-torch.txt -e '.[models,distributed,gpu]' \
 && python3 -m pip list --format=freeze > /tmp/installed.txt \
 && ! grep -v -x -F -f /tmp/installed.txt /tmp/image-torch.txt \
 && mkdir -p /app/data /home/speechpairs/.cache \
 && chown -R speechpairs:speechpairs /app /home/speechpairs
USER speechpairs
ENTRYPOINT ["speechpairs"]
CMD ["run", "examples/quickstart.yaml"]

# ---------------------------------------------------------------------------------------------------
# cpu (default target): Debian slim, CPU torch first so nothing later pulls CUDA wheels; as `make
# setup`: the `models-cpu` extra, then openai-whisper with --no-deps (its triton serves CUDA only).
# ---------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS cpu
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# libsndfile1 (soundfile), ffmpeg (decoding), espeak-ng (phonemizer), sox (synthetic test speech).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libsndfile1 ffmpeg espeak-ng sox \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash speechpairs
WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml constraints.txt README.md prefect.yaml ./
COPY flows flows
COPY tasks tasks
COPY schemas schemas
COPY storage storage
COPY examples examples
RUN pip install -c constraints.txt -e '.[models-cpu,distributed]' \
 && pip install --no-deps -c constraints.txt openai-whisper \
 && python -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 'torch was replaced: ' + torch.__version__)" \
 && ! pip list --format=freeze | grep -i -E '^(nvidia-|cuda-|triton==)' \
 && mkdir -p /app/data /home/speechpairs/.cache \
 && chown -R speechpairs:speechpairs /app /home/speechpairs
USER speechpairs
ENTRYPOINT ["speechpairs"]
CMD ["run", "examples/quickstart.yaml"]
