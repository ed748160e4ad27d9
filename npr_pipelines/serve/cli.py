"""``npr serve`` arguments and entry point; importing this module is cheap (torch, FastAPI and the model
are imported when ``serve`` runs), so ``npr_pipelines.cli`` can register ``add_arguments``/``serve``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--model-path", required=True, help="local directory with the model and tokenizer")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--num-blocks", type=int, default=4096, help="KV blocks in the pool")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-running", type=int, default=64, help="requests decoded concurrently")
    ap.add_argument("--max-queue", type=int, default=256, help="requests waiting; more get HTTP 503")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--log-level", default="info")
    return ap


def serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine thread, serve until interrupted."""
    import torch
    import uvicorn

    from npr_pipelines.engine import EngineConfig
    from npr_pipelines.serve.app import build_state, create_app, load_engine

    logging.basicConfig(level=args.log_level.upper())
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    config = EngineConfig(
        num_blocks=args.num_blocks, block_size=args.block_size, max_running=args.max_running
    )

    def factory():
        return load_engine(args.model_path, device=device, dtype=args.dtype, config=config)[0]

    engine, tokenizer = load_engine(args.model_path, device=device, dtype=args.dtype, config=config)
    state = build_state(
        engine, tokenizer, max_queue=args.max_queue, model_path=str(args.model_path), engine_factory=factory
    )
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        state.worker.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="npr serve", description="Serve the NPR engine over HTTP.")
    return serve(add_arguments(ap).parse_args(argv))
