# speechpairs flow/worker image.
#   CPU (default, last stage):  docker build -t speechpairs .
#   GPU worker (vLLM image):    docker build --target gpu -t speechpairs:gpu .
#   Run:  docker run --rm -v "$PWD/data:/app/data" speechpairs run examples/quickstart.yaml
# No Docker engine runs on the development machines: this file is kept correct by review only.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0

# GPU worker: vLLM's own CUDA image (torch + vllm preinstalled), speechpairs on top.
FROM ${VLLM_IMAGE} AS gpu
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 ffmpeg \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY flows flows
COPY tasks tasks
COPY schemas schemas
COPY storage storage
COPY examples examples
RUN pip install '.[models]'
ENTRYPOINT ["speechpairs"]
CMD ["run", "examples/quickstart.yaml"]

FROM python:3.11-slim-bookworm AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsndfile1 ffmpeg espeak-ng sox git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# CPU torch first, from PyTorch's CPU index, so nothing later pulls CUDA wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml constraints.txt README.md ./
COPY flows flows
COPY tasks tasks
COPY schemas schemas
COPY storage storage
COPY examples examples
RUN pip install -c constraints.txt .
RUN useradd --create-home --uid 1000 speechpairs && chown -R speechpairs /app
USER speechpairs
ENTRYPOINT ["speechpairs"]
CMD ["run", "examples/quickstart.yaml"]
