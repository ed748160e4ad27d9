"""The engine in one background thread, stepping continuously while requests are in flight.

Only the worker thread touches the ``Engine``. Other threads ``submit`` requests (they wait in a
bounded queue until the thread hands them to the engine) and get a ``concurrent.futures.Future`` of
the ``EngineOutput``; ``abort`` is thread-safe too. When nothing is in flight the thread sleeps on a
condition variable. ``run_exclusive`` runs maintenance (a weight update) in the engine thread at a
moment when no request is running, so no request ever mixes two models.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from npr_pipelines.engine import Engine, EngineOutput, Request

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The bounded request queue is full; the caller should retry later (HTTP 503)."""


class WorkerStopped(RuntimeError):
    """The worker was closed."""


@dataclass
class Counters:
    """Monotonic counters since the worker started (read with ``EngineWorker.snapshot``)."""

    requests_submitted: int = 0
    requests_rejected: int = 0  # queue full
    requests_finished: int = 0
    requests_failed: int = 0  # the engine raised while they were in flight
    prompt_tokens: int = 0
    completion_tokens: int = 0  # flattened response tokens (all branches, inserted included)
    decode_tokens: int = 0  # sampled tokens run through the model
    finish_reasons: dict[str, int] = field(default_factory=dict)


class EngineWorker:
    """Owns ``engine`` and its thread. ``max_queue``: requests accepted but not yet running."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int = 256,
        engine_factory: Callable[[], Engine] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.engine = engine
        self.max_queue = max_queue
        self.engine_factory = engine_factory  # a fresh engine after a failed step (None: keep failing)
        self._cv = threading.Condition()
        self._pending: deque[tuple[Request, Future[EngineOutput]]] = deque()
        self._inflight: dict[str, Future[EngineOutput]] = {}
        self._aborts: list[str] = []
        self._jobs: deque[tuple[Callable[[Engine], Any], Future[Any], bool]] = deque()
        self._paused = False
        self._stopped = False
        self.counters = Counters()
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, name="npr-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- client side
    def submit(self, request: Request) -> Future[EngineOutput]:
        """Queue ``request``; raises ``QueueFull`` when ``max_queue`` requests already wait."""
        fut: Future[EngineOutput] = Future()
        with self._cv:
            if self._stopped:
                raise WorkerStopped("the engine worker is stopped")
            rid = request.request_id
            if rid in self._inflight or any(r.request_id == rid for r, _ in self._pending):
                raise ValueError(f"request id {rid!r} is already in flight")
            if self.queue_depth >= self.max_queue:
                self.counters.requests_rejected += 1
                raise QueueFull(f"request queue is full ({self.queue_depth} waiting, max {self.max_queue})")
            self._pending.append((request, fut))
            self.counters.requests_submitted += 1
            self._cv.notify()
        return fut

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

    def run_exclusive(self, fn: Callable[[Engine], Any], *, abort_running: bool = False) -> Future[Any]:
        """Run ``fn(engine)`` in the engine thread once no request is running; a Future of its result.

        Running requests finish first (or end ``ABORTED`` with ``abort_running``); requests submitted
        meanwhile wait in the queue and start after ``fn`` returned. This is how ``npr serve`` swaps
        weights: requests see either the old model or the new one, never both.
        """
        fut: Future[Any] = Future()
        with self._cv:
            if self._stopped:
                raise WorkerStopped("the engine worker is stopped")
            self._jobs.append((fn, fut, abort_running))
            self._cv.notify()
        return fut

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not running yet (not yet handed over, or waiting inside the engine)."""
        return len(self._pending) + self.engine.num_waiting

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the engine thread between steps (maintenance; tests fill the queue this way)."""
        with self._cv:
            self._paused = True
        try:
            yield
        finally:
            with self._cv:
                self._paused = False
                self._cv.notify()

    def snapshot(self) -> dict:
        """Counters and gauges. Gauges are read while the engine may be mid-step: exact when idle."""
        with self._cv:
            eng = self.engine
            pool = eng.pool
            c = self.counters
            return {
                "uptime_s": time.time() - self._started,
                "requests_submitted": c.requests_submitted,
                "requests_rejected": c.requests_rejected,
                "requests_finished": c.requests_finished,
                "requests_failed": c.requests_failed,
                "finish_reasons": dict(c.finish_reasons),
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "decode_tokens": c.decode_tokens,
                "requests_running": eng.num_running,
                "queue_depth": self.queue_depth,
                "max_queue": self.max_queue,
                "kv_blocks_in_use": pool.num_blocks - pool.num_free,
                "kv_blocks_total": pool.num_blocks,
                "kv_block_size": pool.block_size,
                "kv_view_tokens": eng.model.view_tokens(),
                "kv_view_bytes": eng.model.view_bytes(),
                "engine_steps": eng.stats.steps,
                "preemptions": eng.stats.preemptions,
            }

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; requests still in flight fail with ``WorkerStopped``."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)

    # ----------------------------------------------------------------- the thread
    def _loop(self) -> None:
        # The engine runs outside the lock, so submit() never waits for a step; the lock only guards
        # the hand-over lists and the in-flight map.
        while True:
            with self._cv:
                while not self._stopped and (
                    self._paused
                    or not (self._pending or self._aborts or self._jobs or self.engine.has_unfinished())
                ):
                    self._cv.wait()
                if self._stopped:
                    self._fail_all(WorkerStopped("the engine worker was stopped"))
                    self._fail_jobs(WorkerStopped("the engine worker was stopped"))
                    return
                job = self._jobs[0] if self._jobs else None
                incoming = []
                if job is None:  # while a job waits, new requests stay queued (they must see the new model)
                    incoming = list(self._pending)
                    self._pending.clear()
                elif job[2]:
                    self._aborts.extend(self._inflight)
                aborts, self._aborts = self._aborts, []
                for request, fut in incoming:
                    if fut.set_running_or_notify_cancel():
                        self._inflight[request.request_id] = fut
            if job is not None and not aborts and not self.engine.has_unfinished():
                self._run_job()
                continue
            for request, fut in incoming:
                if fut.cancelled():
                    continue
                try:
                    self.engine.add_request(request)
                except ValueError as exc:  # invalid for this engine (e.g. parallel mode without tags)
                    with self._cv:
                        self._inflight.pop(request.request_id, None)
                    fut.set_exception(exc)
            for rid in aborts:
                self.engine.abort(rid)
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail what was in flight, maybe start a fresh engine
                log.exception("engine step failed")
                with self._cv:
                    self._fail_all(exc)
                if self.engine_factory is not None:
                    self.engine = self.engine_factory()
                continue
            with self._cv:
                for out in outputs:
                    self._deliver(out)

    def _deliver(self, out: EngineOutput) -> None:
        fut = self._inflight.pop(out.request_id, None)
        if fut is None:  # failed earlier (its abort output surfaces now)
            return
        c = self.counters
        c.requests_finished += 1
        c.prompt_tokens += out.prompt_len
        c.completion_tokens += out.total_tokens
        c.decode_tokens += out.decode_tokens
        key = out.finish_reason.value
        c.finish_reasons[key] = c.finish_reasons.get(key, 0) + 1
        if not fut.done():
            fut.set_result(out)

    def _run_job(self) -> None:
        """Run the oldest exclusive job (the engine is idle; called from the engine thread only)."""
        with self._cv:
            fn, fut, _ = self._jobs.popleft()
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(self.engine))
        except Exception as exc:  # reported to the caller; the engine keeps serving
            fut.set_exception(exc)

    def _fail_jobs(self, exc: BaseException) -> None:
        """Under the lock: fail the exclusive jobs still waiting."""
        while self._jobs:
            _, fut, _ = self._jobs.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """Under the lock: fail every request in flight or queued (their KV is released by abort)."""
        for rid in list(self._inflight):
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
        failed = list(self._inflight.values()) + [f for _, f in self._pending]
        self._inflight.clear()
        self._pending.clear()
        for fut in failed:
            self.counters.requests_failed += 1
            if not fut.done():
                fut.set_exception(exc)
