# Worker image: this package and its locked dependencies (CPU build of torch from the lock).
# Build from the repository root: docker build -f docker/worker.Dockerfile -t npr-worker .
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends build-essential make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/npr
COPY requirements.lock pyproject.toml README.md ./
RUN python -m pip install --no-cache-dir -U pip && python -m pip install --no-cache-dir -r requirements.lock
COPY npr_pipelines ./npr_pipelines
COPY assets ./assets
COPY resources ./resources
COPY workspace.yaml ./
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation -e .
ENV PYTHONUNBUFFERED=1
USER 1000
