"""``npr serve``: the NPR engine over HTTP with SGLang's native ``/generate`` shape (see ``api.py``).

Names are imported on first use, so ``npr_pipelines.serve.cli`` stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BadRequest": "api",
    "Prompt": "api",
    "finish_reason": "api",
    "format_output": "api",
    "parse_generate": "api",
    "ServerState": "app",
    "ServerThread": "app",
    "build_state": "app",
    "create_app": "app",
    "load_engine": "app",
    "EngineWorker": "worker",
    "QueueFull": "worker",
    "WorkerStopped": "worker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"npr_pipelines.serve.{module}"), name)
