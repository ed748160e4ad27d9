"""The scheduler loop: every live stream of every running request advances in one batched forward.

Per step: admit waiting requests while KV blocks allow; end what the budgets no longer fit; run one
forward over every stream's unfed tokens (prompts, inserted headers/takeaways, the KV-only
``</guideline>`` of a fork and ``</step>`` of finished branches, one sampled token per live stream);
sample; hand each token to the request's ``RequestFlow``; then bring the KV tables in line with the
flows (new slots, fork tables, join tables) and release what no stream needs any more. Per-step work
is over each request's ``active`` streams (those holding a table), never over its whole history.

When the pool runs out of blocks while a request grows, the newest running request is preempted (the
oldest always progresses): its blocks are released and it restarts from its prompt later with the
same seeds, so its output does not depend on the preemption. A request that alone does not fit ends
with ``KV_CAPACITY``.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from npr_pipelines.engine.flow import Event, RequestFlow, Stream, StreamKind, stream_seed
from npr_pipelines.engine.kv_cache import BlockPool, KVTable, OutOfBlocks, check_invariants
from npr_pipelines.engine.model import PagedQwen3, Row
from npr_pipelines.engine.sampling import SampleRow, UniformDraws, sample
from npr_pipelines.engine.types import EngineOutput, FinishReason, Request, TokenCodec
from npr_pipelines.structure import TagVocab


@dataclass(frozen=True)
class EngineConfig:
    num_blocks: int = 1024
    block_size: int = 16
    max_running: int = 256  # requests decoded concurrently
    admission_watermark: int = 8  # free blocks kept beyond a new prompt's own when admitting it
    small_query_max: int = 8  # requests with at most this many query tokens in a step attend together
    check_invariants: bool = False  # verify the KV bookkeeping (and the views) after every step (tests)
    pack_weights: bool | None = None  # transposed/fused weight copies (model.py; None: models <= 1 GiB)


@dataclass
class EngineStats:
    """Counters since the engine was built (``reset_peaks`` restarts the peaks).

    ``peak_kv_tokens_held`` is the peak of blocks in use x block size; ``peak_kv_tokens_unshared`` the
    peak of what the live tables would hold as private copies (each rounded up to whole blocks), i.e.
    without prefix sharing. ``peak_view_tokens``: the most tokens held in per-stream views at once.
    """

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    peak_blocks_used: int = 0
    peak_kv_tokens_held: int = 0
    peak_kv_tokens_unshared: int = 0
    peak_view_tokens: int = 0
    requests_finished: int = 0

    def reset_peaks(self) -> None:
        self.peak_blocks_used = self.peak_kv_tokens_held = self.peak_kv_tokens_unshared = 0
        self.peak_view_tokens = 0


_keys = itertools.count()


@dataclass(eq=False)  # identity semantics: held in lists and compared by `is`/`in`
class _Active:
    request: Request
    seed: int
    arrival: float
    flow: RequestFlow
    preemptions: int = 0
    tables: dict[int, KVTable] = field(default_factory=dict)  # stream uid -> its table
    kv_base: dict[int, int] = field(default_factory=dict)  # stream uid -> table length before its tokens
    generators: dict[int, UniformDraws] = field(default_factory=dict)
    active: list[Stream] = field(default_factory=list)  # streams holding a table, in creation order
    pending: list[Stream] = field(default_factory=list)  # streams still without a table
    preempted: bool = False
    key: int = field(default_factory=lambda: next(_keys))  # this incarnation's KV view
    first_token: float | None = None
    prefill: int = 0
    decode: int = 0


class Engine:
    """NPR parallel decoding over a Hugging Face Qwen3 model (CPU or CUDA, any float dtype)."""

    def __init__(
        self,
        model: torch.nn.Module,
        codec: TokenCodec,
        tags: TagVocab | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.codec = codec
        self.tags = tags
        self.pool = BlockPool(self.config.num_blocks, self.config.block_size)
        self.model = PagedQwen3(
            model,
            self.config.num_blocks,
            self.config.block_size,
            self.config.small_query_max,
            pack_weights=self.config.pack_weights,
        )
        self.stats = EngineStats()
        self._waiting: deque[_Active] = deque()
        self._running: list[_Active] = []  # in admission order
        self._done: list[EngineOutput] = []

    # ----------------------------------------------------------------- public API
    def add_request(self, request: Request) -> None:
        seed = request.params.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        flow = RequestFlow(request, self.codec, self.tags)  # validates mode/tags early
        self._waiting.append(_Active(request, seed, time.perf_counter(), flow))

    def abort(self, request_id: str) -> None:
        for a in list(self._waiting):
            if a.request.request_id == request_id:
                self._waiting.remove(a)
                a.flow.abort()
                self._finish(a)
        for a in list(self._running):
            if a.request.request_id == request_id:
                a.flow.abort()
                self._finish(a)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def generate(self, requests: Sequence[Request]) -> list[EngineOutput]:
        """Decode all ``requests`` to the end; outputs in input order."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        for r in requests:
            self.add_request(r)
        wanted = set(ids)
        outputs: dict[str, EngineOutput] = {}
        others: list[EngineOutput] = []
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in wanted:
                    outputs[out.request_id] = out
                else:
                    others.append(out)  # added earlier through add_request: returned by the next step()
        self._done.extend(others)  # step() drains everything, so these are all that is left
        return [outputs[i] for i in ids]

    def replace_model(self, model: torch.nn.Module) -> None:
        """Decode with ``model`` from the next step on (``npr serve``'s weight update from disk).

        Only while idle: KV entries computed by the old weights must never be attended to by the new
        ones, so the pool and views are rebuilt for the new module rather than reused.
        """
        if self.has_unfinished():
            raise RuntimeError("replace_model needs an idle engine: requests are still in flight")
        cfg = self.config
        self.model = PagedQwen3(
            model, cfg.num_blocks, cfg.block_size, cfg.small_query_max, pack_weights=cfg.pack_weights
        )

    def tables(self) -> Iterable[KVTable]:
        for a in self._running:
            yield from a.tables.values()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def check(self) -> None:
        check_invariants(self.pool, self.tables())
        self.model.check_views()
        if not self._running and self.pool.num_free != self.pool.num_blocks:
            raise AssertionError(
                f"{self.pool.num_blocks - self.pool.num_free} blocks held with nothing running"
            )

    # ----------------------------------------------------------------- the loop
    def step(self) -> list[EngineOutput]:
        """One scheduler iteration; returns the requests that finished in it (and earlier aborts)."""
        self._admit()
        for a in list(self._running):
            if a.flow.check_budgets() is Event.FINISHED:
                self._finish(a)
        work = [(a, s) for a in self._running for s in a.active if s.fed < len(s.tokens)]
        if work:
            self._run(work)
        self.stats.steps += 1
        self._track_memory()
        if self.config.check_invariants:
            self.check()
        if not self._running:
            self.model.trim()
        return self._drain()

    def _track_memory(self) -> None:
        st, pool = self.stats, self.pool
        used = pool.num_blocks - pool.num_free
        st.peak_blocks_used = max(st.peak_blocks_used, used)
        st.peak_kv_tokens_held = max(st.peak_kv_tokens_held, used * pool.block_size)
        unshared = sum(pool.blocks_for(len(a.tables[s.uid])) for a in self._running for s in a.active)
        st.peak_kv_tokens_unshared = max(st.peak_kv_tokens_unshared, unshared * pool.block_size)
        st.peak_view_tokens = max(st.peak_view_tokens, self.model.peak_view_tokens)
        self.model.peak_view_tokens = 0

    def _drain(self) -> list[EngineOutput]:
        out, self._done = self._done, []
        return out

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_running:
            a = self._waiting[0]
            need = self.pool.blocks_for(len(a.request.prompt_ids)) + self.config.admission_watermark
            if self._running and self.pool.num_free < need:
                return
            self._waiting.popleft()
            self._running.append(a)
            a.pending.append(a.flow.streams[0])
            status = self._sync(a)
            if status == "failed":
                self._finish(a)
            elif status == "preempted":
                return

    def _run(self, work: list[tuple[_Active, Stream]]) -> None:
        rows: list[Row] = []
        samplers: list[SampleRow] = []
        sampled: list[tuple[_Active, Stream]] = []
        branch = StreamKind.BRANCH
        prefill = decode = 0
        for a, s in work:
            fed = s.fed
            rows.append(
                Row(
                    a.key, s.uid, s.kind is branch, a.tables[s.uid], s.tokens[fed:], s.positions[fed:], s.live
                )
            )
            n = len(s.tokens) - fed
            n_inserted = n if n == 1 and s.inserted[-1] else sum(s.inserted[fed:])  # prompt + inserted
            a.prefill += n_inserted
            a.decode += n - n_inserted
            prefill += n_inserted
            decode += n - n_inserted
            if s.live:
                samplers.append(SampleRow(a.request.params, self._generator(a, s), s, a.request.logits_hook))
                sampled.append((a, s))
        self.stats.prefill_tokens += prefill
        self.stats.decode_tokens += decode
        logits = self.model.forward(rows)
        for _, s in work:
            s.fed = len(s.tokens)
        tokens, logprobs = sample(logits, samplers) if samplers else ([], [])

        now = time.perf_counter()
        touched: list[_Active] = []
        for (a, s), tok, lp in zip(sampled, tokens, logprobs, strict=True):
            if not touched or touched[-1] is not a:
                touched.append(a)
                if a.first_token is None:
                    a.first_token = now
            if a.flow.finished or not s.live:
                continue
            event = a.flow.accept(s, tok, lp)
            if event is Event.FORK:
                a.pending.extend(a.flow.blocks[-1].branches)
            elif event is Event.JOIN:
                cont = a.flow.blocks[-1].continuation
                assert cont is not None
                a.pending.append(cont)
        for a in list(self._running):
            if a.preempted:  # by an earlier request that grew
                continue
            status = "finished" if a.flow.finished else self._sync(a)
            if status in ("finished", "failed"):
                self._finish(a)
            elif status == "ok":
                self._release_unneeded(a)

    # ----------------------------------------------------------------- KV tables
    def _generator(self, a: _Active, s: Stream) -> UniformDraws:
        draws = a.generators.get(s.uid)
        if draws is None:
            g = torch.Generator(device="cpu")
            g.manual_seed(stream_seed(a.seed, s.path))
            draws = a.generators[s.uid] = UniformDraws(g)
        return draws

    def _sync(self, a: _Active) -> str:
        """Give every stream of ``a`` a table with a slot per token: "ok", "preempted" or "failed".

        When blocks run out the NEWEST running request is preempted (``a`` itself if it is the
        newest), so the oldest always progresses; ``_sync_once`` is idempotent and simply runs again.
        "failed": ``a`` runs alone and still does not fit (finish ``KV_CAPACITY``).
        """
        while True:
            try:
                self._sync_once(a)
                return "ok"
            except OutOfBlocks:
                if len(self._running) == 1:
                    a.flow.end_request(
                        FinishReason.KV_CAPACITY, f"needs more than {self.pool.num_blocks} KV blocks"
                    )
                    return "failed"
                victim = self._running[-1]
                self._preempt(victim)
                if victim is a:
                    return "preempted"

    def _sync_once(self, a: _Active) -> None:
        # Existing tables first: a fork's branch tables copy the trunk's WITH its </guideline> slot, a
        # join's table concatenates branch tables WITH their </step> slots.
        for s in a.active:
            table = a.tables[s.uid]
            want = a.kv_base[s.uid] + len(s.tokens)
            if len(table) < want:
                table.append(want - len(table))
        for s in a.pending:
            if s.uid not in a.tables:
                self._new_table(a, s)
                a.active.append(s)
            table = a.tables[s.uid]
            want = a.kv_base[s.uid] + len(s.tokens)
            if len(table) < want:
                table.append(want - len(table))
        a.pending.clear()

    def _new_table(self, a: _Active, s: Stream) -> KVTable:
        flow = a.flow
        if s.kind is StreamKind.BRANCH:
            parent = a.tables[flow.blocks[s.path[0]].trunk.uid]
            table = parent.fork()
        elif s.path == (0,):
            table = KVTable(self.pool)
        else:
            block = flow.blocks[s.path[0] - 1]
            parts = [(a.tables[block.branches[0].uid], 0)]
            parts += [(a.tables[b.uid], a.kv_base[b.uid]) for b in block.branches[1:]]
            table = KVTable.concat(self.pool, parts)
        a.tables[s.uid] = table
        a.kv_base[s.uid] = len(table)
        return table

    def _release_unneeded(self, a: _Active) -> None:
        """Release the tables of streams with nothing left to run that no later stream will read."""
        keep = []
        for s in a.active:
            if not s.live and s.fed == len(s.tokens) and not a.flow.awaiting_join(s):
                a.tables[s.uid].release()
                continue
            keep.append(s)
        a.active = keep

    def _release_all(self, a: _Active) -> None:
        for table in a.tables.values():
            table.release()
        self.model.release(a.key)
        a.active = []
        a.pending = []

    def _preempt(self, a: _Active) -> None:
        a.preempted = True
        self._release_all(a)
        self._running.remove(a)
        fresh = _Active(a.request, a.seed, a.arrival, RequestFlow(a.request, self.codec, self.tags))
        fresh.preemptions = a.preemptions + 1
        self.stats.preemptions += 1
        self._waiting.appendleft(fresh)

    # ----------------------------------------------------------------- results
    def _finish(self, a: _Active) -> None:
        self.stats.requests_finished += 1
        self._release_all(a)
        if a in self._running:
            self._running.remove(a)
        self._done.append(self._output(a))

    def _output(self, a: _Active) -> EngineOutput:
        now = time.perf_counter()
        return a.flow.output(
            self.tags,
            self.codec,
            prefill_tokens=a.prefill,
            decode_tokens=a.decode,
            time_to_first_token_s=None if a.first_token is None else a.first_token - a.arrival,
            latency_s=now - a.arrival,
            preemptions=a.preemptions,
        )
