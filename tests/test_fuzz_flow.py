"""Fuzzing the structure parser and the engine's fork/join flow control with random token streams
(#11 item 2): no crash (only the documented exceptions), every request ends with a finish reason
within its budgets, and no KV-cache block or attention view stays held once a request has finished.

Streams are drawn from the test codec's whole vocabulary, biased towards the tag tokens and towards
fragments of the parallel format (``<plan>1: x</plan>``, ``</guideline>``, ``</step>``, EOS), so that
forks, joins, truncations and every malformed-structure path are reached; each test asserts that they
were (the fuzz is not vacuous). Case counts (hypothesis ``max_examples``):

- parser: ``PARSER_CASES`` random streams (parse, validate, format scores, layout, metrics);
- flow control alone (``RequestFlow``, no model): ``FLOW_CASES`` requests with random budgets;
- the whole engine on a tiny model: ``ENGINE_CASES`` batches of 1-4 requests with random budgets,
  pool sizes (preemption, ``KV_CAPACITY``) and aborts, the KV bookkeeping checked after every step.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from npr_pipelines.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from npr_pipelines.engine.flow import Event, RequestFlow, Stream
from npr_pipelines.engine.testing import EOS_ID, CharCodec, tiny_qwen3
from npr_pipelines.structure import (
    Tag,
    format_score_v1,
    format_score_v2,
    parallel_layout,
    parse_tokens,
    trace_metrics,
    validate,
)
from npr_pipelines.structure.layout import LayoutError

PARSER_CASES = 1000
FLOW_CASES = 1500
ENGINE_CASES = 150

pytestmark = pytest.mark.usefixtures("one_thread")

cc = CharCodec()
TAG_IDS = [cc.tags[t] for t in Tag]
FRAGMENTS = [
    [cc.tags[Tag.GUIDELINE]],
    [cc.tags[Tag.PLAN], *cc.encode("1: x"), cc.tags[Tag.PLAN_END]],
    [cc.tags[Tag.PLAN], *cc.encode("2: y"), cc.tags[Tag.PLAN_END]],
    [cc.tags[Tag.PLAN], *cc.encode("z"), cc.tags[Tag.PLAN_END]],  # unnumbered
    [cc.tags[Tag.GUIDELINE_END]],
    [*cc.encode(" s"), cc.tags[Tag.STEP_END]],
    [*cc.encode("t"), cc.tags[Tag.TAKEAWAY_END]],
    cc.encode("\\boxed{42}"),
    [EOS_ID],
]


def token_streams(max_pieces: int) -> st.SearchStrategy[list[int]]:
    """Random token ids: any id of the vocabulary, a tag, or a fragment of the format."""
    piece = st.one_of(
        st.integers(0, cc.vocab_size - 1).map(lambda t: [t]),
        st.sampled_from(TAG_IDS).map(lambda t: [t]),
        st.sampled_from(FRAGMENTS),
    )
    return st.lists(piece, max_size=max_pieces).map(lambda pieces: [t for p in pieces for t in p])


class StreamSource:
    """What each stream of a request samples: its scripted tokens (keyed by stream path, see
    ``engine.testing.trace_script``), then random ``tail`` tokens from an offset derived from its path.
    Also a logits hook that forces those tokens, for the engine."""

    def __init__(self, script: dict[tuple[int, ...], list[int]], tail: list[int]) -> None:
        self.script = script
        self.tail = tail or [EOS_ID]

    def __repr__(self) -> str:
        return f"StreamSource({self.script!r}, {self.tail!r})"

    def token(self, stream: Stream) -> int:
        tokens = self.script.get(stream.path, [])
        n = stream.n_sampled
        if n < len(tokens):
            return tokens[n]
        start = int(hashlib.sha256(repr(stream.path).encode()).hexdigest()[:8], 16)
        return self.tail[(start + n - len(tokens)) % len(self.tail)]

    def flattened(self) -> list[int]:
        """The scripts in the engine's flattened layout, with the step headers and ``<takeaway>`` the
        engine would insert: a whole (possibly malformed) response for the parser."""
        out: list[int] = []
        r = 0
        while (r,) in self.script:
            out += self.script[(r,)]
            k = 0
            while (r, k) in self.script:
                out += [cc.tags[Tag.STEP], *cc.encode(f"{k + 1}:"), *self.script[(r, k)]]
                k += 1
            r += 1
            out += [cc.tags[Tag.TAKEAWAY]] if (r,) in self.script else []
        return out

    def __call__(self, stream: Stream, logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[self.token(stream)] = 0.0
        return out


def _plan(number: str) -> list[int]:
    return [cc.tags[Tag.PLAN], *cc.encode(f"{number}x"), cc.tags[Tag.PLAN_END]]


@st.composite
def token_sources(draw: st.DrawFn, noise: int = 4) -> StreamSource:
    """Near-format scripts with random noise: rounds of a guideline with 0-6 plans (numbered or not),
    branches with random bodies that usually close with ``</step>``, takeaways, a final answer; then
    random tails. Noise (random ids, tags, fragments) reaches every malformed path."""
    junk = st.one_of(st.just([]), token_streams(noise))  # half of the pieces are clean
    script: dict[tuple[int, ...], list[int]] = {}
    trunk: list[int] = []
    rounds = draw(st.integers(0, 3))
    for r in range(rounds):
        n_plans = draw(st.integers(0, 6))
        labels = draw(st.sampled_from(["1: ", "1: ", "1: ", "", "k: "]))
        trunk += [*draw(junk), cc.tags[Tag.GUIDELINE]]
        for k in range(n_plans):
            trunk += _plan(f"{k + 1}: " if labels == "1: " else labels)
        script[(r,)] = [*trunk, cc.tags[Tag.GUIDELINE_END]]
        for k in range(n_plans):
            closed = draw(st.sampled_from([True, True, True, False]))
            script[(r, k)] = [*cc.encode(" b"), *draw(junk), *([cc.tags[Tag.STEP_END]] if closed else [])]
        trunk = [*cc.encode("t"), *draw(junk), cc.tags[Tag.TAKEAWAY_END]]
    script[(rounds,)] = [*trunk, *cc.encode("\\boxed{1}"), *draw(junk), EOS_ID]
    return StreamSource(script, draw(token_streams(10)))


# -- the parser --------------------------------------------------------------------------------------

PARSER_SEEN: Counter[str] = Counter()


@settings(max_examples=PARSER_CASES, deadline=None, database=None)
@given(
    ids=st.one_of(token_streams(60), token_sources().map(StreamSource.flattened)), offset=st.integers(0, 5)
)
def fuzz_parser(ids: list[int], offset: int) -> None:
    table = parse_tokens(ids, cc.tags, cc.decode, offset=offset)
    verdict = validate(table, max_plans=5)
    assert verdict.valid == (not verdict.violations)
    assert table.length == len(ids) + offset
    spans = [b.guideline for b in table.blocks]
    assert all(offset <= s.start < s.end <= table.length for s in spans)
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))  # ordered, disjoint
    text = cc.decode(ids)
    # 0 is perfect, deductions are negative
    assert math.isfinite(format_score_v1(text)) and format_score_v2(text) <= 0.0
    try:
        layout = parallel_layout(table, len(ids) + offset)
    except LayoutError:  # documented: a truncated or nested structure cannot be laid out
        assert not verdict.valid  # ... but every valid trace can
        PARSER_SEEN["layout_error"] += 1
        return
    assert len(layout.position_ids) == len(ids) + offset
    metrics = trace_metrics(table, layout, prompt_len=offset)
    assert metrics.rounds == len(table.blocks)
    PARSER_SEEN["blocks" if table.blocks else "no_blocks"] += 1
    PARSER_SEEN["valid"] += verdict.valid


def test_parser_never_raises_on_random_token_streams() -> None:
    PARSER_SEEN.clear()
    fuzz_parser()
    print(f"parser fuzz, {PARSER_CASES} cases: {dict(PARSER_SEEN)}")
    assert PARSER_SEEN["blocks"] and PARSER_SEEN["no_blocks"] and PARSER_SEEN["layout_error"], PARSER_SEEN


# -- flow control, no model --------------------------------------------------------------------------


@st.composite
def sampling(draw: st.DrawFn) -> SamplingParams:
    return SamplingParams(
        mode=draw(st.sampled_from(["parallel", "parallel", "sequential"])),
        temperature=1.0,
        seed=0,
        max_tokens=draw(st.integers(1, 120)),
        max_total_tokens=draw(st.one_of(st.none(), st.integers(1, 200))),
        max_plans=draw(st.integers(1, 5)),
        max_branch_tokens=draw(st.one_of(st.none(), st.integers(1, 30))),
        fork_reserve=draw(st.integers(0, 4)),
        stop_token_ids=tuple(draw(st.lists(st.integers(0, cc.vocab_size - 1), max_size=1))),
    )


def check_output_budgets(
    params: SamplingParams, response: list[int], positions: list[int], prompt: int
) -> None:
    critical = max(positions) + 1 - prompt if positions else 0
    assert critical <= params.max_tokens, (critical, params)
    if params.max_total_tokens is not None:
        assert len(response) <= params.max_total_tokens, (len(response), params)


FLOW_SEEN: Counter[str] = Counter()


def drive_flow(flow: RequestFlow, next_token: Callable[[Stream], int]) -> int:
    """Step ``flow`` the way the engine does (budgets, then one token per live stream); return steps."""
    steps = 0
    while not flow.finished:
        steps += 1
        assert steps <= 10 * (flow.params.max_tokens + 10), "the request never ends"
        if flow.check_budgets() is Event.FINISHED:
            break
        live = flow.live_streams()
        assert live, "an unfinished request with nothing to sample"
        for stream in live:
            if flow.finished or not stream.live:
                continue
            FLOW_SEEN[flow.accept(stream, next_token(stream), -1.0).value] += 1
    return steps


@settings(max_examples=FLOW_CASES, deadline=None, database=None)
@given(
    prompt=st.lists(st.integers(0, cc.vocab_size - 1), max_size=6), params=sampling(), source=token_sources()
)
# Found by this fuzz: the branches used the room the fork had left for <takeaway>, whose insertion
# then ran one token past max_tokens (the join now ends the request with LENGTH instead).
@example(
    prompt=[0],
    params=SamplingParams(seed=0, max_tokens=28, max_plans=2),
    source=StreamSource(
        {
            (0,): [2, 4, 11, 74, 72, 43, 5, 4, 12, 74, 72, 43, 5, 3],
            (0, 0): [72, 21, 0, 4, 11, 74, 72, 43, 5],
            (0, 1): [72, 21, 7],
            (1,): [39, 9, 91, 21, 34, 43, 24, 23, 87, 11, 88, 1],
        },
        [0, 7],
    ),
)
def fuzz_flow(prompt: list[int], params: SamplingParams, source: StreamSource) -> None:
    try:
        request = Request("r", prompt, params)
    except ValueError:  # documented: an empty prompt
        assert not prompt
        return
    flow = RequestFlow(request, cc.codec(), cc.tags)
    drive_flow(flow, source.token)

    assert flow.finish is not None and isinstance(flow.finish, FinishReason)
    assert not any(s.live for s in flow.streams)
    response, positions, logprobs, inserted = flow.flattened()
    assert len(response) == len(positions) == len(logprobs) == len(inserted) == flow.response_len
    assert all((lp is None) == ins for lp, ins in zip(logprobs, inserted, strict=True))
    check_output_budgets(params, response, positions, len(prompt))
    segments, forks = flow.record()
    assert sum(s.end - s.start for s in segments) == len(prompt) + len(response)
    assert len(forks) == len(flow.blocks)
    parse_tokens(response, cc.tags, cc.decode, offset=len(prompt))
    FLOW_SEEN[f"finish={flow.finish.value}"] += 1


def test_flow_control_survives_random_token_streams() -> None:
    FLOW_SEEN.clear()
    fuzz_flow()
    finishes = {k for k in FLOW_SEEN if k.startswith("finish=")}
    print(f"flow fuzz, {FLOW_CASES} cases: {dict(FLOW_SEEN)}")
    assert FLOW_SEEN["fork"] and FLOW_SEEN["join"], FLOW_SEEN
    assert len(finishes) >= 10, FLOW_SEEN  # most finish reasons are reached


def test_invalid_requests_raise_the_documented_errors() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        Request("r", [], SamplingParams())
    with pytest.raises(ValueError, match="budgets"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="needs the tags"):
        RequestFlow(Request("r", [5], SamplingParams(mode="parallel")), cc.codec(), None)


# -- the whole engine --------------------------------------------------------------------------------


@functools.cache
def fuzz_model() -> torch.nn.Module:
    return tiny_qwen3(cc.vocab_size, layers=1, hidden=16, seed=4)


def held_blocks(engine: Engine) -> int:
    """Blocks the running requests' tables hold (what the pool may have in use)."""
    return len({b for table in engine.tables() if not table.released for b in table.blocks})


ENGINE_SEEN: Counter[str] = Counter()


@settings(
    max_examples=ENGINE_CASES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    batch=st.lists(
        st.tuples(
            st.lists(st.integers(0, cc.vocab_size - 1), min_size=1, max_size=6),
            sampling(),
            token_sources(),
            st.one_of(st.none(), st.none(), st.integers(1, 40)),  # abort at this step
        ),
        min_size=1,
        max_size=4,
    ),
    capacity=st.sampled_from([24, 64, 160, 2000]),  # KV tokens in the pool
    block_size=st.sampled_from([1, 2, 4, 8]),
)
def fuzz_engine(batch: list, capacity: int, block_size: int) -> None:
    engine = Engine(
        fuzz_model(),
        cc.codec(),
        cc.tags,
        EngineConfig(
            num_blocks=capacity // block_size,
            block_size=block_size,
            admission_watermark=1,
            check_invariants=True,
        ),
    )
    for i, (prompt, params, source, _) in enumerate(batch):
        engine.add_request(Request(f"r{i}", prompt, params, logits_hook=source))
    outputs = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        assert steps < 5000
        for i, (*_, abort_at) in enumerate(batch):
            if abort_at == steps:
                engine.abort(f"r{i}")
        for out in engine.step():  # the cache invariants are checked inside every step
            outputs[out.request_id] = out
        # A finished request holds nothing: every block in use belongs to a request still running.
        assert engine.pool.num_blocks - engine.pool.num_free == held_blocks(engine)
    assert engine.pool.num_free == engine.pool.num_blocks
    assert engine.model.view_tokens() == 0
    engine.check()
    assert set(outputs) == {f"r{i}" for i in range(len(batch))}
    for i, (prompt, params, _, _) in enumerate(batch):
        out = outputs[f"r{i}"]
        check_output_budgets(params, out.response_ids, out.positions, len(prompt))
        if out.finish_reason in (FinishReason.EOS, FinishReason.STOP) and out.span_table.structurally_valid:
            assert out.structure_errors(cc.tags, cc.decode) == []  # engine and trainer agree
        ENGINE_SEEN[f"finish={out.finish_reason.value}"] += 1
        ENGINE_SEEN["triggered"] += out.triggered
    ENGINE_SEEN["preempted"] += engine.stats.preemptions > 0


def test_engine_survives_random_token_streams_and_frees_the_cache() -> None:
    ENGINE_SEEN.clear()
    fuzz_engine()
    print(f"engine fuzz, {ENGINE_CASES} cases: {dict(ENGINE_SEEN)}")
    assert ENGINE_SEEN["triggered"] and ENGINE_SEEN["preempted"], ENGINE_SEEN
    assert ENGINE_SEEN["finish=aborted"] and ENGINE_SEEN["finish=kv_capacity"], ENGINE_SEEN
