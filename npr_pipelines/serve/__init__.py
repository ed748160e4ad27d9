"""``npr serve``: the NPR engine over HTTP with SGLang's native ``/generate`` shape (see ``api.py``)."""

from npr_pipelines.serve.api import BadRequest, Prompt, finish_reason, format_output, parse_generate
from npr_pipelines.serve.app import ServerState, ServerThread, build_state, create_app, load_engine
from npr_pipelines.serve.worker import EngineWorker, QueueFull, WorkerStopped

__all__ = [
    "BadRequest",
    "EngineWorker",
    "Prompt",
    "QueueFull",
    "ServerState",
    "ServerThread",
    "WorkerStopped",
    "build_state",
    "create_app",
    "finish_reason",
    "format_output",
    "load_engine",
    "parse_generate",
]
