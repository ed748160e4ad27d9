"""Requests, sampling parameters, finish reasons and the engine's output contract.

Everything crossing the engine boundary is token ids (DESIGN.md, "Token ids cross boundaries"): a
request carries prompt ids, an output carries response ids in flattened layout order (trunk, branch
1, ..., branch k, takeaway, ...) with per-token positions, log-probs and an engine-inserted flag.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from npr_pipelines.structure import (
    ParallelLayout,
    Segment,
    SpanTable,
    TagVocab,
    parallel_layout,
    parse_tokens,
)

if TYPE_CHECKING:
    import torch

    from npr_pipelines.engine.flow import Stream

Mode = Literal["parallel", "sequential"]


class FinishReason(StrEnum):
    """Why a request or a branch ended. Every truncation has its own value so RL can filter on it."""

    EOS = "eos"  # the trunk sampled an EOS id (the normal end)
    STOP = "stop"  # the trunk sampled one of the request's stop ids
    STEP_END = "step_end"  # a branch sampled </step> (the normal end of a branch)
    LENGTH = "length"  # critical-path budget (max_tokens) exhausted
    TOTAL_BUDGET = "total_budget"  # flattened-token budget (max_total_tokens) exhausted
    FORK_BUDGET = "fork_budget"  # fork refused: the remaining budget cannot fit the branches and the join
    NO_PLANS = "no_plans"  # </guideline> closed a guideline without any numbered plan
    TOO_MANY_PLANS = "too_many_plans"  # more plans than max_plans
    MALFORMED_GUIDELINE = "malformed_guideline"  # </guideline> with no open <guideline>, unnumbered plan, ...
    EOS_IN_BRANCH = "eos_in_branch"  # a branch sampled EOS before </step>
    NESTED_GUIDELINE = "nested_guideline"  # a branch opened <guideline> (nesting is not supported)
    BRANCH_CAP = "branch_cap"  # a branch reached max_branch_tokens without </step>
    SIBLING_FAILED = "sibling_failed"  # a branch stopped because a sibling ended the request
    ABORTED = "aborted"  # the caller aborted the request
    KV_CAPACITY = "kv_capacity"  # the request alone does not fit the KV pool

    @property
    def is_clean(self) -> bool:
        """True for the normal ends (EOS/stop of a request, </step> of a branch)."""
        return self in (FinishReason.EOS, FinishReason.STOP, FinishReason.STEP_END)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; immutable, so branches can never mutate a shared copy.

    Budgets count response tokens, inserted ones included. ``max_tokens`` bounds the critical path
    (max position + 1 - prompt length; in sequential mode simply the response length);
    ``max_total_tokens`` bounds the flattened response (all branches). A fork is refused (finish
    ``FORK_BUDGET``) unless both budgets still fit every branch's header, one body token and
    ``</step>``, the inserted ``<takeaway>``, plus ``fork_reserve`` more tokens.
    """

    mode: Mode = "parallel"
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # multiplicative, over the stream's own tokens
    branch_repetition_penalty: float | None = None  # inside branches (None: repetition_penalty); NPR: 1.02
    seed: int | None = None  # None: a fresh random seed per request
    max_tokens: int = 1024
    max_total_tokens: int | None = None
    max_plans: int = 5
    max_branch_tokens: int | None = None  # per-branch cap (header and </step> included)
    fork_reserve: int = 0
    stop_token_ids: tuple[int, ...] = ()  # end the trunk (both modes); EOS ids come from the codec

    def __post_init__(self) -> None:
        if self.mode not in ("parallel", "sequential"):
            raise ValueError(f"mode must be 'parallel' or 'sequential', got {self.mode!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        if self.repetition_penalty <= 0 or (
            self.branch_repetition_penalty is not None and self.branch_repetition_penalty <= 0
        ):
            raise ValueError("repetition_penalty must be > 0")
        if self.max_tokens < 1 or (self.max_total_tokens is not None and self.max_total_tokens < 1):
            raise ValueError("budgets must be >= 1")
        if self.max_plans < 1:
            raise ValueError("max_plans must be >= 1")


#: ``hook(stream, logits[V]) -> logits[V]``: edits the logits a token is sampled from (tests use it to
#: script the sampled sequence). Log-probs are always taken from the model's unedited logits.
LogitsHook = Callable[["Stream", "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    logits_hook: LogitsHook | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")


@dataclass(frozen=True)
class TokenCodec:
    """How the engine reads plan labels and builds step headers, in token space.

    ``encode`` must not add special tokens; ``decode`` must keep them (tags are special tokens).
    """

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_token_ids: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer, extra_eos_ids: Sequence[int] = ()) -> TokenCodec:
        eos = set(extra_eos_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        if not eos:
            raise ValueError("the tokenizer has no EOS token; pass extra_eos_ids")
        return cls(
            encode=lambda s: list(tokenizer.encode(s, add_special_tokens=False)),
            decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
            eos_token_ids=frozenset(eos),
        )


@dataclass(frozen=True)
class BranchRecord:
    """One executed branch: ``[start, end)`` in absolute (prompt-inclusive) token indices."""

    block: int
    branch: int
    number: str
    start: int
    end: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class ForkRecord:
    """One executed fork, in absolute token indices (what the parser must find at the same places).

    ``guideline_start``/``guideline_end`` index the sampled ``<guideline>``/``</guideline>`` tokens;
    ``takeaway`` indexes the inserted ``<takeaway>`` (None when the request ended before the join).
    """

    guideline_start: int
    guideline_end: int
    plan_numbers: tuple[str, ...]
    branches: tuple[BranchRecord, ...]
    takeaway: int | None


@dataclass
class EngineOutput:
    """Everything RL and evaluation need about one finished request.

    ``logprobs[i]`` is log_softmax(logits / temperature)[token] of the MODEL's logits at sampling time
    (temperature 1 when greedy), before repetition penalty, logits hooks, top-k and top-p; None for
    engine-inserted tokens. ``positions[i]`` is the RoPE position response token i was decoded at
    (the prompt occupies 0..prompt_len-1); ``segments`` is the engine's own layout record (absolute,
    prompt-inclusive offsets). For a complete trace both equal ``parallel_layout(span_table)``, the
    trainer's rule (``structure_errors`` checks it). ``forks`` and the branch finish reasons are the
    engine's record of what it executed; the request's ``finish_reason`` says why it ended.
    """

    request_id: str
    mode: Mode
    prompt_ids: list[int]
    response_ids: list[int]
    positions: list[int]
    logprobs: list[float | None]
    inserted: list[bool]
    finish_reason: FinishReason
    finish_detail: str
    forks: list[ForkRecord]
    segments: list[Segment]
    prefill_tokens: int  # tokens run through the model that were not sampled (prompt + inserted)
    decode_tokens: int  # sampled tokens run through the model
    time_to_first_token_s: float | None
    latency_s: float
    preemptions: int = 0
    span_table: SpanTable | None = None  # parse_tokens(response, offset=prompt_len); None without tags
    #: Where the trace came from when not from this process's engine (``sglang_backend``: the server,
    #: ``approximate``). Empty for the in-process engine, whose traces are exact by construction.
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def total_tokens(self) -> int:
        """Flattened response length (all branches, inserted tokens included)."""
        return len(self.response_ids)

    @property
    def critical_path_tokens(self) -> int:
        return max(self.positions) + 1 - self.prompt_len if self.positions else 0

    @property
    def triggered(self) -> bool:
        """The model sampled ``</guideline>`` closing >= 1 numbered plan and the engine forked."""
        return bool(self.forks)

    @property
    def approximate(self) -> bool:
        """True when some tokens were sampled in a context other than the trainer's layout of the
        trace (parallel mode through stock SGLang re-prefills each join): RL must not treat its
        log-probs as the policy's (PAPO refuses it unless the user opts in)."""
        return bool(self.metadata.get("approximate", False))

    @property
    def branches(self) -> list[BranchRecord]:
        return [b for f in self.forks for b in f.branches]

    def layout(self) -> ParallelLayout:
        """The engine's record as a ``ParallelLayout`` (prompt included)."""
        return ParallelLayout(tuple(self.segments), self.prompt_len + len(self.response_ids))

    def structure_errors(self, tags: TagVocab, decode: Callable[[Sequence[int]], str]) -> list[str]:
        """Differences between the engine's record and the trainer's view of the same ids (empty = same).

        Meaningful for complete traces; a truncated one reports that it cannot be laid out.
        """
        table = parse_tokens(self.response_ids, tags, decode, offset=self.prompt_len)
        errors: list[str] = []
        if len(table.blocks) != len(self.forks):
            errors.append(f"{len(table.blocks)} parsed blocks, {len(self.forks)} forks recorded")
        for i, (block, fork) in enumerate(zip(table.blocks, self.forks, strict=False)):
            parsed = (
                block.guideline.start,
                block.guideline.end - 1,
                tuple(p.number for p in block.plans),
                tuple((s.span.start, s.span.end) for s in block.steps),
                block.takeaway.span.start,
            )
            recorded = (
                fork.guideline_start,
                fork.guideline_end,
                fork.plan_numbers,
                tuple((b.start, b.end) for b in fork.branches),
                fork.takeaway,
            )
            if parsed != recorded:
                errors.append(f"block {i}: parsed {parsed} != recorded {recorded}")
        try:
            trainer = parallel_layout(table)
        except ValueError as exc:
            return [*errors, f"trainer cannot lay out the trace: {exc}"]
        mine = self.layout()
        if list(trainer.position_ids) != list(mine.position_ids):
            errors.append("positions differ from parallel_layout(parse)")
        if _merged(trainer.segments) != _merged(mine.segments):
            errors.append(f"segments differ: trainer {trainer.segments} engine {mine.segments}")
        return errors

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (NaN-free: inserted tokens have log-prob None)."""
        return {
            "request_id": self.request_id,
            "mode": self.mode,
            "prompt_ids": list(self.prompt_ids),
            "response_ids": list(self.response_ids),
            "positions": list(self.positions),
            "logprobs": [None if lp is None or math.isnan(lp) else float(lp) for lp in self.logprobs],
            "inserted": list(self.inserted),
            "finish_reason": self.finish_reason.value,
            "finish_detail": self.finish_detail,
            "forks": [_jsonable(dataclasses.asdict(f)) for f in self.forks],
            "segments": [dataclasses.asdict(s) for s in self.segments],
            "span_table": None if self.span_table is None else _jsonable(dataclasses.asdict(self.span_table)),
            "total_tokens": self.total_tokens,
            "critical_path_tokens": self.critical_path_tokens,
            "triggered": self.triggered,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "time_to_first_token_s": self.time_to_first_token_s,
            "latency_s": self.latency_s,
            "preemptions": self.preemptions,
            "metadata": _jsonable(dict(self.metadata)),
        }


def _merged(segments: Sequence[Segment]) -> list[tuple]:
    """Segments with adjacent shared runs of consecutive positions fused (a pure representation choice)."""
    out: list[list] = []
    for s in segments:
        if not len(s):
            continue
        prev = out[-1] if out else None
        if (
            prev is not None
            and s.block is None
            and prev[3] is None
            and prev[1] == s.start
            and prev[2] + (prev[1] - prev[0]) == s.position
        ):
            prev[1] = s.end
        else:
            out.append([s.start, s.end, s.position, s.block, s.branch])
    return [tuple(x) for x in out]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, StrEnum):
        return obj.value
    return obj
