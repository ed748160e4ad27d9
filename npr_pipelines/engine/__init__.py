"""NPR engine: fork/join flow control (``flow``) over a paged-KV torch backend (``model``, ``engine``)."""

from npr_pipelines.engine.engine import Engine, EngineConfig, EngineStats
from npr_pipelines.engine.flow import Event, RequestFlow, Stream, StreamKind, stream_seed
from npr_pipelines.engine.kv_cache import BlockPool, KVTable, OutOfBlocks, check_invariants
from npr_pipelines.engine.types import (
    BranchRecord,
    EngineOutput,
    FinishReason,
    ForkRecord,
    LogitsHook,
    Request,
    SamplingParams,
    TokenCodec,
)

__all__ = [
    "BlockPool",
    "BranchRecord",
    "Engine",
    "EngineConfig",
    "EngineOutput",
    "EngineStats",
    "Event",
    "FinishReason",
    "ForkRecord",
    "KVTable",
    "LogitsHook",
    "OutOfBlocks",
    "Request",
    "RequestFlow",
    "SamplingParams",
    "Stream",
    "StreamKind",
    "TokenCodec",
    "check_invariants",
    "stream_seed",
]
