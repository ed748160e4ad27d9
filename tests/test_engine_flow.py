"""Flow control: malformed model output never crashes the engine and ends with the right reason;
budgets, caps, stop ids, aborts; sampling is per-branch deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from npr_pipelines.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from npr_pipelines.engine.sampling import apply_repetition_penalty
from npr_pipelines.engine.testing import EOS_ID, CharCodec, ScriptHook, tiny_qwen3, trace_script
from npr_pipelines.structure import Trace, encode_trace, parallel_layout, trace_metrics

R = FinishReason


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cc() -> CharCodec:
    return CharCodec()


@pytest.fixture(scope="module")
def engine(cc: CharCodec) -> Engine:
    model = tiny_qwen3(cc.vocab_size, layers=1, hidden=32)
    return Engine(
        model, cc.codec(), cc.tags, EngineConfig(num_blocks=512, block_size=4, check_invariants=True)
    )


def _guideline(n: int, numbered: bool = True) -> str:
    plans = "".join(f"\n<plan>{f'{k + 1}: ' if numbered else ''}p{k}</plan>" for k in range(n))
    return f"<guideline>{plans}\n</guideline>"


def _run(engine: Engine, cc: CharCodec, cases: dict[str, tuple[dict, SamplingParams]]) -> dict:
    requests = []
    for name, (script, params) in cases.items():
        enc = {path: cc.encode_with_tags(t) if isinstance(t, str) else list(t) for path, t in script.items()}
        requests.append(Request(name, cc.encode(f"{name}\n"), params, logits_hook=ScriptHook(enc)))
    outputs = engine.generate(requests)
    engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks
    for out in outputs:
        json.dumps(out.to_dict())
        assert len(out.response_ids) == len(out.positions) == len(out.logprobs) == len(out.inserted)
    return {o.request_id: o for o in outputs}


def P(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": 0, "max_tokens": 300, **kw})


def test_malformed_output_ends_with_the_right_reason(engine: Engine, cc: CharCodec) -> None:
    eos = [EOS_ID]
    cases = {
        "zero_plans": ({(0,): _guideline(0)}, P()),
        "six_plans": ({(0,): _guideline(6)}, P()),
        "over_custom_max": ({(0,): _guideline(3)}, P(max_plans=2)),
        "unnumbered_plan": ({(0,): _guideline(2, numbered=False)}, P()),
        "close_without_open": ({(0,): "abc</guideline>"}, P()),
        "step_in_guideline": ({(0,): "<guideline><plan>1: a</plan><step></guideline>"}, P()),
        "unclosed_plan": ({(0,): "<guideline><plan>1: a</guideline>"}, P()),
        "eos_in_branch": ({(0,): _guideline(2), (0, 0): " a b", (0, 1): " long text here"}, P()),
        "nested_guideline": ({(0,): _guideline(2), (0, 0): " x</step>", (0, 1): " y<guideline>"}, P()),
        "branch_cap": (
            {(0,): _guideline(2), (0, 0): " short</step>", (0, 1): "x" * 50},
            P(max_branch_tokens=10),
        ),
        "unclosed_step_length": ({(0,): _guideline(1), (0, 0): "y" * 400}, P(max_tokens=60)),
        "total_budget": (
            {(0,): _guideline(3), (0, 0): "a" * 80, (0, 1): "b" * 80, (0, 2): "c" * 80},
            P(max_total_tokens=70),
        ),
        "fork_budget": ({(0,): _guideline(2)}, P(max_tokens=len(cc.encode_with_tags(_guideline(2))) + 3)),
        "trunk_length": ({(0,): "z" * 100}, P(max_tokens=20)),
        "stop_id": ({(0,): "ab;cd"}, P(stop_token_ids=(cc.encode(";")[0],))),
        "eos_trunk": ({(0,): [*cc.encode("done"), *eos]}, P()),
    }
    out = _run(engine, cc, cases)

    expected = {
        "zero_plans": R.NO_PLANS,
        "six_plans": R.TOO_MANY_PLANS,
        "over_custom_max": R.TOO_MANY_PLANS,
        "unnumbered_plan": R.MALFORMED_GUIDELINE,
        "close_without_open": R.MALFORMED_GUIDELINE,
        "step_in_guideline": R.MALFORMED_GUIDELINE,
        "unclosed_plan": R.MALFORMED_GUIDELINE,
        "eos_in_branch": R.EOS_IN_BRANCH,
        "nested_guideline": R.NESTED_GUIDELINE,
        "branch_cap": R.BRANCH_CAP,
        "unclosed_step_length": R.LENGTH,
        "total_budget": R.TOTAL_BUDGET,
        "fork_budget": R.FORK_BUDGET,
        "trunk_length": R.LENGTH,
        "stop_id": R.STOP,
        "eos_trunk": R.EOS,
    }
    assert {k: o.finish_reason for k, o in out.items()} == expected

    # structure failures before a fork: no trigger, nothing inserted
    for name in ("zero_plans", "six_plans", "unnumbered_plan", "close_without_open", "fork_budget"):
        assert not out[name].triggered and not any(out[name].inserted), name
    # branch failures: the culprit carries the reason, a still-running sibling is stopped
    assert [b.finish_reason for b in out["eos_in_branch"].branches] == [R.EOS_IN_BRANCH, R.SIBLING_FAILED]
    assert [b.finish_reason for b in out["nested_guideline"].branches] == [R.STEP_END, R.NESTED_GUIDELINE]
    assert [b.finish_reason for b in out["branch_cap"].branches] == [R.STEP_END, R.BRANCH_CAP]
    assert max(b.end - b.start for b in out["branch_cap"].branches) == 10
    assert out["unclosed_step_length"].critical_path_tokens == 60
    assert out["total_budget"].total_tokens <= 70
    assert {b.finish_reason for b in out["total_budget"].branches} == {R.TOTAL_BUDGET}
    assert out["trunk_length"].total_tokens == 20
    assert cc.decode(out["stop_id"].response_ids) == "ab;"
    assert out["stop_id"].response_ids[-1] == cc.encode(";")[0]


def test_dotted_numbers_and_metrics(engine: Engine, cc: CharCodec) -> None:
    trace = Trace.build([(["a", "b"], ["x", "yy"], "t")], "\\boxed{1}")
    script = trace_script(trace, cc.tags, cc.encode)
    # relabel the plans 1.1 and 1.2: headers follow the model's own labels
    text = cc.decode(script[(0,)]).replace("1: a", "1.1: a").replace("2: b", "1.2: b")
    script[(0,)] = cc.encode_with_tags(text)
    [out] = engine.generate([Request("dot", cc.encode("d\n"), P(), logits_hook=ScriptHook(script))])
    assert out.finish_reason is R.EOS
    assert out.forks[0].plan_numbers == ("1.1", "1.2")
    headers = [cc.decode(out.response_ids[b.start - out.prompt_len :][:5]) for b in out.branches]
    assert headers == ["<step>1.1:", "<step>1.2:"]
    assert out.structure_errors(cc.tags, cc.decode) == []
    metrics = trace_metrics(out.span_table, parallel_layout(out.span_table), out.prompt_len)
    assert (metrics.total_tokens, metrics.critical_path_tokens) == (
        out.total_tokens,
        out.critical_path_tokens,
    )
    assert out.critical_path_tokens < out.total_tokens


def test_abort_frees_everything(engine: Engine, cc: CharCodec) -> None:
    trace = Trace.build([(["a", "b", "c"], ["x" * 30, "y" * 30, "z" * 30], "t")], "\\boxed{1}")
    hook = ScriptHook(trace_script(trace, cc.tags, cc.encode))
    engine.add_request(Request("ab", cc.encode("a\n"), P(), logits_hook=hook))
    engine.add_request(Request("keep", cc.encode("k\n"), P(), logits_hook=hook))
    finished = []
    for _ in range(30):
        finished += engine.step()
    engine.abort("ab")
    finished += engine.step()
    [aborted] = [o for o in finished if o.request_id == "ab"]
    assert aborted.finish_reason is R.ABORTED and aborted.triggered
    assert {b.finish_reason for b in aborted.branches} == {R.ABORTED}
    while engine.has_unfinished():
        finished += engine.step()
    [kept] = [o for o in finished if o.request_id == "keep"]
    assert kept.finish_reason is R.EOS
    assert kept.response_ids == [*encode_trace(trace, cc.tags, cc.encode), EOS_ID]
    engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_branch_sampling_is_independent_of_the_batch(cc: CharCodec) -> None:
    """Free sampling inside scripted forks: a request's tokens do not depend on its batch-mates."""
    model = tiny_qwen3(cc.vocab_size, layers=1, hidden=32, seed=4)
    script = {(0,): cc.encode_with_tags(_guideline(3))}  # branches and continuation sample freely

    def run(ids: list[str]) -> dict:
        engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=512, block_size=4))
        reqs = [
            Request(
                i,
                cc.encode(f"{i}\n"),
                P(seed=12 if i == "other_seed" else 11, max_tokens=40, top_k=30),
                logits_hook=ScriptHook(script, after=None),
            )
            for i in ids
        ]
        return {o.request_id: o for o in engine.generate(reqs)}

    alone = run(["x"])["x"]
    crowd = run(["a", "x", "other_seed"])
    assert alone.triggered
    assert crowd["x"].response_ids == alone.response_ids
    assert crowd["x"].finish_reason is alone.finish_reason
    # another seed: other branch samples
    assert crowd["other_seed"].response_ids != alone.response_ids


def test_repetition_penalty_and_greedy_top_k() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert logits.tolist() == [1.0, -2.0, 0.5, 3.0]
    # greedy, seen token 0 slightly ahead: the branch-only penalty flips the choice in a branch only
    from npr_pipelines.engine import Stream, StreamKind
    from npr_pipelines.engine.sampling import SampleRow, UniformDraws, sample

    params = SamplingParams(temperature=0.0, branch_repetition_penalty=1.5)
    streams = [Stream(kind, (0, 0) if kind is StreamKind.BRANCH else (0,)) for kind in StreamKind]
    for st in streams:
        st.push(0, 0, -1.0)
    rows = [SampleRow(params, UniformDraws(torch.Generator()), st) for st in streams]
    tokens, logprobs = sample(torch.tensor([[2.0, 1.9, 0.0]] * 2), rows)
    chosen = dict(zip([st.kind for st in streams], tokens, strict=True))
    assert chosen == {StreamKind.TRUNK: 0, StreamKind.BRANCH: 1}
    assert logprobs[1] == pytest.approx(torch.log_softmax(torch.tensor([2.0, 1.9, 0.0]), 0)[1].item())
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(mode="beam")  # type: ignore[arg-type]


def test_parallel_mode_needs_tags(cc: CharCodec) -> None:
    model = tiny_qwen3(cc.vocab_size, layers=1, hidden=32)
    engine = Engine(model, cc.codec(), tags=None, config=EngineConfig(num_blocks=16, block_size=4))
    with pytest.raises(ValueError, match="TagVocab"):
        engine.add_request(Request("p", [5, 6], SamplingParams(mode="parallel")))


def test_request_flow_without_a_backend(cc: CharCodec) -> None:
    """The state machine alone: fork at </guideline>, headers and positions from the structure rule,
    join with an inserted <takeaway> at join_position, EOS ends the request."""
    from npr_pipelines.engine import Event, RequestFlow, StreamKind
    from npr_pipelines.structure import Tag, branch_start_position, join_position, step_header_ids

    tags = cc.tags
    flow = RequestFlow(Request("f", cc.encode("pq\n"), P()), cc.codec(), tags)
    trunk = flow.streams[0]
    events = [flow.accept(trunk, t, -1.0) for t in cc.encode_with_tags(_guideline(2))]
    assert events[-1] is Event.FORK and set(events[:-1]) == {Event.NONE}
    g_pos = trunk.positions[-1]
    b1, b2 = flow.live_streams()
    assert (b1.kind, b1.path, b2.path) == (StreamKind.BRANCH, (0, 0), (0, 1))
    assert b1.tokens == step_header_ids("1", tags, cc.encode) and b2.tokens == step_header_ids(
        "2", tags, cc.encode
    )
    assert b1.positions[0] == b2.positions[0] == branch_start_position(g_pos)
    assert all(b1.inserted) and not trunk.live and trunk.finish is None  # complete, not failed
    for t in cc.encode(" long body"):
        assert flow.accept(b1, t, -1.0) is Event.NONE
    assert flow.accept(b2, tags[Tag.STEP_END], -1.0) is Event.NONE  # waits for its sibling
    assert flow.awaiting_join(b2)
    assert flow.accept(b1, tags[Tag.STEP_END], -1.0) is Event.JOIN
    cont = flow.streams[-1]
    assert cont.tokens == [tags[Tag.TAKEAWAY]] and cont.inserted == [True]
    assert cont.positions == [join_position([b1.positions[-1], b2.positions[-1]])]
    assert flow.accept(cont, EOS_ID, -1.0) is Event.FINISHED
    assert flow.finish is R.EOS
    ids, positions, logprobs, inserted = flow.flattened()
    assert len(ids) == flow.response_len == len(positions) == len(logprobs) == len(inserted)
    assert [lp is None for lp in logprobs] == inserted


def test_generate_keeps_outputs_of_requests_added_earlier(engine: Engine, cc: CharCodec) -> None:
    script = {(0,): cc.encode("x")}
    engine.add_request(Request("early", cc.encode("e\n"), P(), logits_hook=ScriptHook(script)))
    [out] = engine.generate([Request("late", cc.encode("l\n"), P(), logits_hook=ScriptHook(script))])
    assert out.request_id == "late"
    assert [o.request_id for o in engine.step()] == ["early"]
    assert not engine.has_unfinished()
