# SGLang server image: stock SGLang (pyproject's `sglang` extra) with its own pins from docker/sglang.lock
# (torch 2.14.1 CUDA 13, transformers 5.19.0), which cannot share requirements.lock. The project talks
# to it over HTTP only (npr_pipelines.engine.sglang_backend). GPU-only: run it with the NVIDIA runtime.
#
# Leave SGLANG_RETURN_ORIGINAL_LOGPROB unset: with it SGLang returns pre-temperature log-probs, while
# the engine's contract (and PAPO) uses log_softmax(logits / temperature).
#
# Build from the repository root:  docker build -f docker/sglang.Dockerfile -t npr-sglang .
# Run:  docker run --gpus all -v /models:/models npr-sglang --model-path /models/base
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libnuma1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 1000 --create-home sglang
WORKDIR /opt/sglang
COPY docker/sglang.lock ./
RUN python -m pip install --no-cache-dir -U pip \
    && python -m pip install --no-cache-dir -r sglang.lock
ENV PYTHONUNBUFFERED=1 \
    HOME=/home/sglang
USER sglang
EXPOSE 30000
# Inside the compose network the server must listen on the container's interface; compose publishes
# nothing of it on the host.
ENTRYPOINT ["python", "-m", "sglang.launch_server", "--host", "0.0.0.0", "--port", "30000"]
CMD ["--model-path", "/var/lib/npr/models/base"]
