"""Fork/join flow control of one request, independent of how tokens are computed.

A request is a list of *streams* in flattened layout order: trunk segments (prompt + text up to the
first ``</guideline>``; then ``<takeaway>`` + text up to the next ``</guideline>``; ...) and the
branches of each block between them. A backend repeatedly asks which tokens each stream still has to
run through the model (``unfed``), which streams need a sampled token (``live``), and hands every
sampled token back to ``accept``, which returns what changed (a fork, a join, the end).

Rules (DESIGN.md "Trigger", engine.md §4.1):

* parallel mode: when the trunk samples ``</guideline>`` the numbered plans of the current guideline
  are read from token ids; 1..max_plans plans and enough budget -> one branch per plan, each
  starting with the inserted ``step_header_ids(number)`` at ``branch_start_position``. A branch ends
  at ``</step>``; when all siblings have, ``<takeaway>`` is inserted at ``join_position`` and a new
  trunk segment continues. Everything else ends the request with an explicit ``FinishReason``.
* sequential mode: one stream, ends at EOS/stop ids or the budget; tags are ordinary tokens.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from npr_pipelines.engine.types import (
    BranchRecord,
    EngineOutput,
    FinishReason,
    ForkRecord,
    Request,
    TokenCodec,
)
from npr_pipelines.structure import (
    Segment,
    Tag,
    TagVocab,
    branch_start_position,
    join_position,
    lex_tokens,
    parse_tokens,
    split_number,
    step_header_ids,
)

_uids = itertools.count()


class StreamKind(Enum):
    TRUNK = "trunk"
    BRANCH = "branch"


@dataclass(eq=False)  # identity semantics: held in lists and compared by `is`/`in`
class Stream:
    """One decoding stream. ``tokens[:n_prompt]`` is the prompt (first trunk segment only).

    ``path`` identifies the stream within its request: ``(r,)`` for trunk segment r, ``(r, k)`` for
    branch k of block r; it seeds the stream's own random generator.
    """

    kind: StreamKind
    path: tuple[int, ...]
    n_prompt: int = 0
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    inserted: list[bool] = field(default_factory=list)
    fed: int = 0  # tokens already run through the model (their KV exists)
    live: bool = True  # still samples tokens
    finish: FinishReason | None = None
    number: str = ""  # the plan number (branches)
    n_sampled: int = 0  # tokens this stream sampled (not inserted, not prompt)
    uid: int = field(default_factory=lambda: next(_uids))  # process-unique: keys the stream's KV view

    @property
    def unfed(self) -> list[int]:
        return self.tokens[self.fed :]

    @property
    def unfed_positions(self) -> list[int]:
        return self.positions[self.fed :]

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens[self.n_prompt :]

    def push(self, token: int, position: int, logprob: float | None) -> None:
        self.tokens.append(int(token))
        self.positions.append(position)
        self.logprobs.append(logprob)
        self.inserted.append(logprob is None)
        if logprob is not None:
            self.n_sampled += 1

    def end(self, reason: FinishReason) -> None:
        self.live = False
        self.finish = reason


@dataclass(eq=False)  # identity semantics: held in lists and compared by `is`/`in`
class _Block:
    trunk: Stream  # the segment whose </guideline> forked
    guideline_start: int  # index into trunk.tokens
    numbers: tuple[str, ...]
    branches: list[Stream]
    continuation: Stream | None = None


class Event(Enum):
    NONE = "none"
    FORK = "fork"  # new branch streams were added (flow.blocks[-1].branches)
    JOIN = "join"  # a continuation trunk segment was added (flow.blocks[-1].continuation)
    FINISHED = "finished"  # the request ended (flow.finish is set)


def stream_seed(seed: int, path: tuple[int, ...]) -> int:
    """A 63-bit seed for the stream at ``path`` of a request seeded with ``seed`` (stable across runs)."""
    digest = hashlib.sha256(f"{seed}|{'.'.join(map(str, path))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RequestFlow:
    """The fork/join state machine of one request."""

    def __init__(self, request: Request, codec: TokenCodec, tags: TagVocab | None) -> None:
        params = request.params
        if params.mode == "parallel" and tags is None:
            raise ValueError("parallel mode needs the tags as single tokens (a TagVocab)")
        self.request = request
        self.params = params
        self.codec = codec
        self.tags = tags
        self.prompt_len = len(request.prompt_ids)
        trunk = Stream(StreamKind.TRUNK, (0,), n_prompt=self.prompt_len)
        for i, tok in enumerate(request.prompt_ids):
            trunk.push(tok, i, None)
        self.streams: list[Stream] = [trunk]
        self.trunk = trunk  # the current trunk segment
        self.blocks: list[_Block] = []
        self.finish: FinishReason | None = None
        self.finish_detail = ""
        self.response_len = 0
        self._stop_ids = set(params.stop_token_ids)
        # tag ids as plain ints: accept() runs once per sampled token
        self._step_end = tags[Tag.STEP_END] if tags is not None else None
        self._guideline = tags[Tag.GUIDELINE] if tags is not None else None
        self._fork_id = tags[Tag.GUIDELINE_END] if tags is not None and params.mode == "parallel" else None
        self._headers: dict[str, list[int]] = {}

    # ----------------------------------------------------------------- queries
    @property
    def finished(self) -> bool:
        return self.finish is not None

    def live_streams(self) -> list[Stream]:
        """Streams still sampling: the current trunk segment, or the current block's branches (O(k),
        not O(history): earlier segments and blocks are complete)."""
        if self.trunk.live:
            return [self.trunk]
        if self.blocks and self.blocks[-1].continuation is None:
            return [b for b in self.blocks[-1].branches if b.live]
        return []

    def critical_used(self, next_position: int) -> int:
        """Critical-path response tokens once a token sits at ``next_position``."""
        return next_position + 1 - self.prompt_len

    def awaiting_join(self, stream: Stream) -> bool:
        """A finished branch whose KV the coming join still needs."""
        if stream.kind is not StreamKind.BRANCH or self.finished:
            return False
        block = self.blocks[stream.path[0]]
        return block.continuation is None

    # ----------------------------------------------------------------- transitions
    def end_request(self, reason: FinishReason, detail: str = "", *, culprit: Stream | None = None) -> Event:
        """End the request; live branches other than ``culprit`` end as SIBLING_FAILED."""
        if culprit is not None and culprit.live:
            culprit.end(reason)
        for s in self.streams:
            if s.live:
                s.end(reason if s.kind is StreamKind.TRUNK else FinishReason.SIBLING_FAILED)
        self.finish = reason
        self.finish_detail = detail or reason.value
        return Event.FINISHED

    def abort(self) -> Event:
        for s in self.streams:
            if s.live:
                s.end(FinishReason.ABORTED)
        self.finish = FinishReason.ABORTED
        self.finish_detail = "aborted by the caller"
        return Event.FINISHED

    def check_budgets(self) -> Event:
        """Before a decode step: end what cannot take one more token. Deterministic per request."""
        if self.finished:
            return Event.FINISHED
        p = self.params
        live = self.live_streams()
        if p.max_total_tokens is not None and self.response_len + len(live) > p.max_total_tokens:
            for s in live:
                s.end(FinishReason.TOTAL_BUDGET)
            return self.end_request(
                FinishReason.TOTAL_BUDGET, f"{self.response_len} + {len(live)} > {p.max_total_tokens}"
            )
        for s in live:
            if self.critical_used(s.positions[-1] + 1) > p.max_tokens:
                return self.end_request(FinishReason.LENGTH, f"stream {s.path} at max_tokens", culprit=s)
            if (
                s.kind is StreamKind.BRANCH
                and p.max_branch_tokens is not None
                and len(s.tokens) + 1 > p.max_branch_tokens
            ):
                return self.end_request(
                    FinishReason.BRANCH_CAP, f"branch {s.path} at {len(s.tokens)} tokens", culprit=s
                )
        return Event.NONE

    def accept(self, stream: Stream, token: int, logprob: float) -> Event:
        """Record a token sampled by ``stream`` and apply the flow rules."""
        assert stream.live and not self.finished
        stream.push(token, stream.positions[-1] + 1, logprob)
        self.response_len += 1
        eos = token in self.codec.eos_token_ids
        if stream.kind is StreamKind.BRANCH:
            assert self.tags is not None
            if token == self._step_end:
                stream.end(FinishReason.STEP_END)
                return self._maybe_join(stream)
            if eos:
                return self.end_request(
                    FinishReason.EOS_IN_BRANCH, f"EOS in branch {stream.path}", culprit=stream
                )
            if token == self._guideline:
                return self.end_request(
                    FinishReason.NESTED_GUIDELINE, f"<guideline> in branch {stream.path}", culprit=stream
                )
            return Event.NONE
        if eos:
            return self.end_request(FinishReason.EOS)
        if token in self._stop_ids:
            return self.end_request(FinishReason.STOP, f"stop id {token}")
        if token == self._fork_id:
            return self._fork(stream)
        return Event.NONE

    # ----------------------------------------------------------------- fork / join
    def header(self, number: str) -> list[int]:
        assert self.tags is not None
        if number not in self._headers:
            self._headers[number] = step_header_ids(number, self.tags, self.codec.encode)
        return self._headers[number]

    def read_plans(self, trunk: Stream) -> tuple[int, list[str | None], str]:
        """Plans of the guideline ``trunk`` just closed: (index of its <guideline>, numbers, problem)."""
        assert self.tags is not None
        open_id = self.tags[Tag.GUIDELINE]
        body_end = len(trunk.tokens) - 1  # the </guideline> just sampled
        start = next(
            (i for i in range(body_end - 1, trunk.n_prompt - 1, -1) if trunk.tokens[i] == open_id), None
        )
        if start is None:
            return -1, [], "</guideline> without an open <guideline>"
        numbers: list[str | None] = []
        open_plan: list[str] | None = None
        for lex in lex_tokens(trunk.tokens[start + 1 : body_end], self.tags, self.codec.decode):
            if lex.tag is None:
                if open_plan is not None:
                    open_plan.append(lex.text)
            elif lex.tag is Tag.PLAN and open_plan is None:
                open_plan = []
            elif lex.tag is Tag.PLAN_END and open_plan is not None:
                numbers.append(split_number("".join(open_plan))[0])
                open_plan = None
            else:
                return start, numbers, f"{lex.tag.value} inside a guideline"
        if open_plan is not None:
            return start, numbers, "unclosed <plan>"
        if any(n is None for n in numbers):
            return start, numbers, "a plan without a 'k:' number"
        return start, numbers, ""

    def _fork(self, trunk: Stream) -> Event:
        p = self.params
        start, numbers, problem = self.read_plans(trunk)
        if problem:
            return self.end_request(FinishReason.MALFORMED_GUIDELINE, problem)
        if not numbers:
            return self.end_request(FinishReason.NO_PLANS)
        if len(numbers) > p.max_plans:
            return self.end_request(FinishReason.TOO_MANY_PLANS, f"{len(numbers)} plans > {p.max_plans}")
        headers = [self.header(n) for n in numbers if n is not None]
        # Minimum of a well-formed block: header + one body token + </step> per branch, then <takeaway>.
        need_critical = max(len(h) for h in headers) + 2 + 1 + p.fork_reserve
        room_critical = p.max_tokens - self.critical_used(trunk.positions[-1])
        need_total = sum(len(h) + 2 for h in headers) + 1 + p.fork_reserve
        room_total = None if p.max_total_tokens is None else p.max_total_tokens - self.response_len
        if need_critical > room_critical or (room_total is not None and need_total > room_total):
            return self.end_request(
                FinishReason.FORK_BUDGET,
                f"fork of {len(numbers)} needs {need_critical} critical/{need_total} total tokens, "
                f"room {room_critical}/{room_total}",
            )
        trunk.live = False  # the segment is complete (no finish reason); its </guideline> is still unfed
        r = len(self.blocks)
        first = branch_start_position(trunk.positions[-1])
        branches = []
        for k, (number, header) in enumerate(zip(numbers, headers, strict=True)):
            b = Stream(StreamKind.BRANCH, (r, k), number=number or "")
            for j, tok in enumerate(header):
                b.push(tok, first + j, None)
            branches.append(b)
        self.response_len += sum(len(h) for h in headers)
        self.blocks.append(_Block(trunk, start, tuple(n or "" for n in numbers), branches))
        at = self.streams.index(trunk) + 1
        self.streams[at:at] = branches
        return Event.FORK

    def _maybe_join(self, branch: Stream) -> Event:
        block = self.blocks[branch.path[0]]
        if any(b.live for b in block.branches):
            return Event.NONE
        assert self.tags is not None
        at = join_position([b.positions[-1] for b in block.branches])
        # The branches may have used the room the fork reserved for <takeaway>: inserting it anyway
        # would overrun a budget by one token, so the request ends as truncated instead.
        p = self.params
        if self.critical_used(at) > p.max_tokens:
            return self.end_request(FinishReason.LENGTH, f"no room for <takeaway> at position {at}")
        if p.max_total_tokens is not None and self.response_len + 1 > p.max_total_tokens:
            return self.end_request(
                FinishReason.TOTAL_BUDGET, f"no room for <takeaway> in {p.max_total_tokens}"
            )
        cont = Stream(StreamKind.TRUNK, (len(self.blocks),))
        cont.push(self.tags[Tag.TAKEAWAY], at, None)
        self.response_len += 1
        block.continuation = cont
        self.streams.append(cont)
        self.trunk = cont
        return Event.JOIN

    # ----------------------------------------------------------------- the record
    def flattened(self) -> tuple[list[int], list[int], list[float | None], list[bool]]:
        """Response ids, positions, log-probs and inserted flags in flattened layout order."""
        ids: list[int] = []
        pos: list[int] = []
        lps: list[float | None] = []
        ins: list[bool] = []
        for s in self.streams:
            n = s.n_prompt
            ids += s.tokens[n:]
            pos += s.positions[n:]
            lps += s.logprobs[n:]
            ins += s.inserted[n:]
        return ids, pos, lps, ins

    def record(self) -> tuple[list[Segment], list[ForkRecord]]:
        """The engine's own layout (absolute offsets) and its forks."""
        offsets: dict[int, int] = {}
        segments: list[Segment] = []
        cursor = 0
        for s in self.streams:
            offsets[id(s)] = cursor
            if s.tokens:
                block, branch = (s.path[0], s.path[1]) if s.kind is StreamKind.BRANCH else (None, None)
                segments.append(Segment(cursor, cursor + len(s.tokens), s.positions[0], block, branch))
            cursor += len(s.tokens)
        forks = []
        for r, blk in enumerate(self.blocks):
            base = offsets[id(blk.trunk)]
            branches = tuple(
                BranchRecord(
                    r,
                    k,
                    b.number,
                    offsets[id(b)],
                    offsets[id(b)] + len(b.tokens),
                    b.finish or FinishReason.ABORTED,
                )
                for k, b in enumerate(blk.branches)
            )
            cont = blk.continuation
            forks.append(
                ForkRecord(
                    guideline_start=base + blk.guideline_start,
                    guideline_end=base + len(blk.trunk.tokens) - 1,
                    plan_numbers=blk.numbers,
                    branches=branches,
                    takeaway=None if cont is None else offsets[id(cont)],
                )
            )
        return segments, forks

    def output(
        self,
        tags: TagVocab | None,
        codec: TokenCodec,
        *,
        prefill_tokens: int,
        decode_tokens: int,
        **extra: Any,
    ) -> EngineOutput:
        """The finished request as an ``EngineOutput``: the flattened response, the layout record and,
        with tag tokens, the span table; ``extra`` holds the backend's own fields (timings, metadata)."""
        assert self.finish is not None
        ids, pos, lps, ins = self.flattened()
        segments, forks = self.record()
        prompt = list(self.request.prompt_ids)
        table = None if tags is None else parse_tokens(ids, tags, codec.decode, offset=len(prompt))
        return EngineOutput(
            request_id=self.request.request_id,
            mode=self.params.mode,
            prompt_ids=prompt,
            response_ids=ids,
            positions=pos,
            logprobs=lps,
            inserted=ins,
            finish_reason=self.finish,
            finish_detail=self.finish_detail,
            forks=forks,
            segments=segments,
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            span_table=table,
            **extra,
        )
