"""The HTTP server: FastAPI routes over an ``EngineWorker``.

Routes: ``POST /generate`` (``api.py``), ``GET /health``, ``GET /get_model_info``, ``GET /metrics``
(Prometheus text; ``?format=json`` for JSON), ``POST /abort_request`` (``{"rid": ...}``),
``POST /update_weights_from_disk`` (SGLang's: ``{"model_path": dir}`` -> ``{"success", "message",
"num_paused_requests"}``, 400 with ``success: false`` when refused).
A full queue answers ``503`` with ``{"error": {"type": "queue_full", ...}}`` and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from npr_pipelines.engine import Engine, EngineConfig, LogitsHook, TokenCodec
from npr_pipelines.engine import Request as EngineRequest
from npr_pipelines.serve.api import BadRequest, Prompt, format_output, parse_generate
from npr_pipelines.serve.worker import EngineWorker, QueueFull, WorkerStopped
from npr_pipelines.storage.manifest import ArtifactError
from npr_pipelines.structure import TagVocab

log = logging.getLogger(__name__)

#: Test/embedding hook: ``prompt -> logits hook`` (never reachable over HTTP).
HookFactory = Callable[[Prompt], LogitsHook | None]


@dataclass
class ServerState:
    worker: EngineWorker
    tokenize: Callable[[str], list[int]] | None
    detokenize: Callable[[Sequence[int]], str] | None
    vocab_size: int
    model_info: dict[str, Any]
    hook_factory: HookFactory | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_model(model_path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """A causal LM from a local directory: safetensors only (pickles refused before anything reads
    them, headers checked, and a carried ``MANIFEST.json`` verified: ``check_weights_dir``), no remote
    code, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    from npr_pipelines.storage.weights import check_weights_dir

    path = str(model_path)
    check_weights_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype),
        trust_remote_code=False,
        use_safetensors=True,
        local_files_only=True,
    ).to(device)
    model.eval()
    return model


def load_engine(
    model_path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    config: EngineConfig | None = None,
) -> tuple[Engine, Any]:
    """Model and tokenizer from a local directory (``from_pretrained``, ``trust_remote_code=False``).

    The weights must be safetensors: pickled weights are refused before anything reads them, and a
    truncated or corrupt weights file is named (``storage.weights.check_weights_dir``).
    """
    from transformers import AutoTokenizer

    path = str(model_path)
    model = load_model(path, device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    try:
        tags: TagVocab | None = TagVocab.from_tokenizer(tokenizer)
    except ValueError:
        tags = None  # the tags are not single tokens: sequential mode only
        log.warning("%s has no NPR tag tokens: only mode='sequential' is served", path)
    return Engine(model, TokenCodec.from_tokenizer(tokenizer), tags, config or EngineConfig()), tokenizer


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="npr serve", docs_url=None, redoc_url=None)
    app.state.npr = state

    def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(
            {"error": {"type": kind, "message": message}}, status_code=status, headers=headers
        )

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "bad_request", "the body is not valid JSON")
        try:
            prompts, batch = parse_generate(body, state.tokenize, state.vocab_size)
        except BadRequest as exc:
            return error(400, "bad_request", str(exc))
        worker = state.worker
        futures = []
        try:
            for p in prompts:
                hook = state.hook_factory(p) if state.hook_factory is not None else None
                futures.append(worker.submit(EngineRequest(p.rid, p.input_ids, p.params, logits_hook=hook)))
        except QueueFull as exc:
            for f in futures:  # a batch is all or nothing
                f.cancel()
            for p in prompts[: len(futures)]:
                worker.abort(p.rid)
            return error(503, "queue_full", str(exc), {"Retry-After": "1"})
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        except WorkerStopped as exc:
            return error(503, "unavailable", str(exc))
        try:
            outputs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except ValueError as exc:  # rejected by the engine (e.g. parallel mode without tags)
            return error(400, "bad_request", str(exc))
        except WorkerStopped as exc:
            return error(503, "unavailable", str(exc))
        except Exception as exc:
            log.exception("generation failed")
            return error(500, "engine_error", f"{type(exc).__name__}: {exc}")
        results = [
            format_output(out, p.return_logprob, state.detokenize)
            for out, p in zip(outputs, prompts, strict=True)
        ]
        return JSONResponse(results if batch else results[0])

    @app.get("/health")
    async def health() -> Any:
        if not state.worker.alive:
            return error(503, "unavailable", "the engine thread is not running")
        return {"status": "ok"}

    @app.get("/get_model_info")
    async def model_info() -> Any:
        return state.model_info

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Any:
        body = await request.json()
        rid = body.get("rid") if isinstance(body, dict) else None
        if not isinstance(rid, str):
            return error(400, "bad_request", "give the request's 'rid'")
        state.worker.abort(rid)
        return {"rid": rid, "status": "abort requested"}

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            body = None
        try:
            update = parse_weight_update(body)
            model = await asyncio.to_thread(load_compatible_model, state, update.model_path)
        except (BadRequest, ArtifactError, OSError, ValueError) as exc:
            return JSONResponse(
                {"success": False, "message": str(exc), "num_paused_requests": 0}, status_code=400
            )
        try:
            await asyncio.wrap_future(
                state.worker.run_exclusive(
                    lambda engine: swap_model(state, engine, model, update),
                    abort_running=update.abort_running,
                )
            )
        except WorkerStopped as exc:
            return error(503, "unavailable", str(exc))
        return {
            "success": True,
            "message": f"weights loaded from {update.model_path}",
            "num_paused_requests": 0,
        }

    @app.get("/metrics")
    async def metrics(format: str = "prometheus") -> Any:
        snap = state.worker.snapshot()
        if format == "json":
            return snap
        return PlainTextResponse(prometheus_text(snap), media_type="text/plain; version=0.0.4")

    return app


_METRICS: tuple[tuple[str, str, str], ...] = (
    # (snapshot key, type, help)
    ("requests_submitted", "counter", "Requests accepted into the queue."),
    ("requests_rejected", "counter", "Requests refused because the queue was full (HTTP 503)."),
    ("requests_finished", "counter", "Requests that finished (any finish reason)."),
    ("requests_failed", "counter", "Requests failed by an engine error."),
    ("prompt_tokens", "counter", "Prompt tokens of finished requests."),
    ("completion_tokens", "counter", "Flattened response tokens of finished requests (all branches)."),
    ("decode_tokens", "counter", "Sampled tokens run through the model."),
    ("engine_steps", "counter", "Engine scheduler steps."),
    ("preemptions", "counter", "Requests preempted for KV memory (restarted later)."),
    ("requests_running", "gauge", "Requests being decoded."),
    ("queue_depth", "gauge", "Requests accepted but not running yet."),
    ("max_queue", "gauge", "Queue capacity."),
    ("kv_blocks_in_use", "gauge", "KV cache blocks held."),
    ("kv_blocks_total", "gauge", "KV cache blocks in the pool."),
    ("kv_view_tokens", "gauge", "Tokens held in the per-request attention views."),
    ("kv_view_bytes", "gauge", "Bytes allocated for the attention views."),
)


@dataclass(frozen=True)
class WeightUpdate:
    """A parsed ``/update_weights_from_disk`` body (SGLang's ``UpdateWeightFromDiskReqInput``)."""

    model_path: str
    abort_running: bool = False
    weight_version: str | None = None


#: SGLang fields accepted and ignored: nothing is cached between requests here, and there is no
#: CUDA graph or asynchronous update to ask for.
_IGNORED_UPDATE_KEYS = {"flush_cache", "torch_empty_cache", "recapture_cuda_graph", "token_step", "is_async"}


def parse_weight_update(body: Any) -> WeightUpdate:
    """Validate an update body; unknown fields and other load formats are refused, not ignored."""
    if not isinstance(body, dict) or not isinstance(body.get("model_path"), str) or not body["model_path"]:
        raise BadRequest("give 'model_path': a local model directory")
    known = {"model_path", "load_format", "abort_all_requests", "weight_version", *_IGNORED_UPDATE_KEYS}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown fields: {unknown}")
    if body.get("load_format") not in (None, "auto", "safetensors"):
        raise BadRequest(f"load_format {body['load_format']!r} is not supported (safetensors only)")
    if body.get("is_async") or body.get("keep_pause"):
        raise BadRequest("asynchronous or paused updates are not supported")
    version = body.get("weight_version")
    return WeightUpdate(
        body["model_path"], bool(body.get("abort_all_requests")), None if version is None else str(version)
    )


def load_compatible_model(state: ServerState, path: str) -> torch.nn.Module:
    """Load ``path`` on the serving device and dtype, refusing a model the running one cannot be
    swapped for (another architecture or vocabulary: the tokenizer and tags stay the server's)."""
    current = state.worker.engine.model
    model = load_model(path, device=str(current.device), dtype=str(current.dtype).removeprefix("torch."))
    old = {k: tuple(v.shape) for k, v in current.hf.state_dict().items()}
    new = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if old != new or type(model) is not type(current.hf):
        diff = sorted(set(old.items()) ^ set(new.items()))[:3]
        raise ValueError(f"{path}: not the served architecture (first differences: {diff})")
    return model


def swap_model(state: ServerState, engine: Engine, model: torch.nn.Module, update: WeightUpdate) -> None:
    """In the engine thread, with nothing running: decode with ``model`` from now on; a crashed step
    restarts from the new weights too."""
    engine.replace_model(model)
    state.model_info["model_path"] = update.model_path
    state.model_info["weight_version"] = update.weight_version
    worker = state.worker
    if worker.engine_factory is not None:
        codec, tags, config = engine.codec, engine.tags, engine.config
        device, dtype = str(engine.model.device), str(engine.model.dtype).removeprefix("torch.")

        def factory() -> Engine:
            return Engine(load_model(update.model_path, device=device, dtype=dtype), codec, tags, config)

        worker.engine_factory = factory


def prometheus_text(snap: dict[str, Any]) -> str:
    lines = []
    for key, kind, text in _METRICS:
        name = f"npr_{key}_total" if kind == "counter" else f"npr_{key}"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {snap[key]}"]
    lines += [
        "# HELP npr_finish_reason_total Finished requests by finish reason.",
        "# TYPE npr_finish_reason_total counter",
    ]
    for reason, n in sorted(snap["finish_reasons"].items()):
        lines.append(f'npr_finish_reason_total{{reason="{reason}"}} {n}')
    return "\n".join(lines) + "\n"


def build_state(
    engine: Engine,
    tokenizer: Any = None,
    *,
    max_queue: int = 256,
    model_path: str = "",
    hook_factory: HookFactory | None = None,
    engine_factory: Callable[[], Engine] | None = None,
) -> ServerState:
    """Wrap ``engine`` (and optionally its tokenizer) in a running worker."""
    worker = EngineWorker(engine, max_queue=max_queue, engine_factory=engine_factory)
    tokenize = detokenize = None
    if tokenizer is not None:
        tokenize = lambda text: list(tokenizer(text)["input_ids"])  # noqa: E731
        detokenize = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    hf = engine.model.hf
    cfg = engine.config
    info = {
        "model_path": model_path,
        "tokenizer_path": model_path if tokenizer is not None else None,
        "is_generation": True,
        "model_type": getattr(hf.config, "model_type", None),
        "vocab_size": engine.model.vocab_size,
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "device": str(engine.model.device),
        "modes": ["parallel", "sequential"] if engine.tags is not None else ["sequential"],
        "tags": None if engine.tags is None else {t.value: i for t, i in engine.tags.ids.items()},
        "eos_token_ids": sorted(engine.codec.eos_token_ids),
        "max_queue": max_queue,
        "engine": {
            "num_blocks": cfg.num_blocks,
            "block_size": cfg.block_size,
            "max_running": cfg.max_running,
            "kv_bytes_per_token": engine.model.kv_bytes_per_token(),
        },
    }
    return ServerState(worker, tokenize, detokenize, engine.model.vocab_size, info, hook_factory)


class ServerThread:
    """Serve ``app`` with uvicorn in a background thread on an already bound socket (tests, notebooks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            threading.Event().wait(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
