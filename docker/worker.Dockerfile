# Worker image: this package and its locked dependencies (requirements.lock), DeepSpeed included. It runs
# the Ray head and workers, the Dagster webserver and daemon and the MLflow server of docker/compose.yaml.
#
# torch comes at the lock's version from TORCH_INDEX_URL: the default is PyTorch's CPU index; for CUDA
# pass --build-arg TORCH_INDEX_URL=https://pypi.org/simple (PyPI's Linux wheel is the CUDA build, its
# CUDA libraries come as nvidia-* wheels at the versions that torch release pins) or a PyTorch CUDA
# index matching your driver. DeepSpeed needs no CUDA toolkit here: the project compiles no DeepSpeed op.
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t npr-worker .
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t npr-worker:cuda .
FROM python:3.11-slim-bookworm
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential make \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 1000 --create-home npr \
    && mkdir -p /var/lib/npr /opt/dagster/home \
    && chown npr:npr /var/lib/npr /opt/dagster/home
WORKDIR /opt/npr
COPY requirements.lock pyproject.toml README.md ./
# torch alone first (its version read from the lock, from the chosen index), then the whole lock: the
# installed torch satisfies its pin, so every other version is the lock's.
RUN python -m pip install --no-cache-dir -U pip \
    && python -m pip install --no-cache-dir --no-deps --index-url "$TORCH_INDEX_URL" \
        "$(grep -E '^torch==' requirements.lock)" \
    && python -m pip install --no-cache-dir -r requirements.lock
COPY npr_pipelines ./npr_pipelines
COPY assets ./assets
COPY resources ./resources
COPY workspace.yaml ./
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation -e .
ENV PYTHONUNBUFFERED=1 \
    HOME=/home/npr \
    NPR_HOME=/var/lib/npr \
    DAGSTER_HOME=/opt/dagster/home
USER npr
