"""KV bookkeeping: reference-counted blocks, zero-copy forks, joins by slot concatenation, and the
cache invariants after every step of randomized fork/join/finish/abort traffic (with preemption)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from npr_pipelines.engine import (
    BlockPool,
    Engine,
    EngineConfig,
    FinishReason,
    KVTable,
    OutOfBlocks,
    Request,
    SamplingParams,
    check_invariants,
)
from npr_pipelines.engine.testing import EOS_ID, CharCodec, ScriptHook, tiny_qwen3
from npr_pipelines.structure import Tag

R = FinishReason


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fork_shares_blocks_without_copying_and_join_concatenates() -> None:
    pool = BlockPool(num_blocks=16, block_size=4)
    trunk = KVTable(pool)
    trunk.append(6)  # blocks b0 (full), b1 (2 of 4)
    assert trunk.slots == [0, 1, 2, 3, 4, 5] and pool.num_free == 14
    a, b = trunk.fork(), trunk.fork()
    assert [pool.refcount[x] for x in trunk.blocks] == [3, 3]
    trunk.release()
    # the shared partial block is read-only: each branch writes into a fresh block
    sa, sb = a.append(3), b.append(1)
    assert {s // 4 for s in sa}.isdisjoint(trunk.blocks) and {s // 4 for s in sb}.isdisjoint(trunk.blocks)
    assert a.slots[:6] == b.slots[:6] == [0, 1, 2, 3, 4, 5]
    check_invariants(pool, [a, b])
    joined = KVTable.concat(pool, [(a, 0), (b, 6)])
    assert joined.slots == a.slots + b.slots[6:]
    take = joined.append(1)  # the last block is still held by branch b: fresh block
    assert take[0] // 4 not in a.blocks + b.blocks
    a.release()
    b.release()
    check_invariants(pool, [joined])
    assert joined.append(1) == [take[0] + 1]  # sole holder now: appends in place
    joined.release()
    check_invariants(pool, [])
    assert pool.num_free == 16


def test_out_of_blocks_and_invariant_checker() -> None:
    pool = BlockPool(num_blocks=2, block_size=2)
    t = KVTable(pool)
    t.append(4)
    with pytest.raises(OutOfBlocks):
        t.append(1)
    check_invariants(pool, [t])
    pool.refcount[0] += 1
    with pytest.raises(AssertionError, match="refcount"):
        check_invariants(pool, [t])
    pool.refcount[0] -= 1
    t.release()
    with pytest.raises(AssertionError, match="free block"):
        pool.decref(0)


# --------------------------------------------------------------------------- randomized traffic
@dataclass(frozen=True)
class Spec:
    prompt_len: int
    rounds: tuple[tuple[int, tuple[tuple[int, str], ...]], ...]  # (plans, ((body_len, fail), ...))
    abort_at: int | None


FAILS = ("ok",) * 12 + ("eos", "nested", "cap")


@st.composite
def specs(draw) -> Spec:
    rounds = []
    for _ in range(draw(st.integers(0, 3))):
        plans = draw(st.sampled_from([1, 2, 2, 3, 3, 4, 5, 0, 6]))
        branches = tuple(
            (draw(st.integers(0, 6)), draw(st.sampled_from(FAILS))) for _ in range(min(plans, 5))
        )
        rounds.append((plans, branches))
    abort_at = draw(st.one_of(st.none(), st.none(), st.integers(1, 60)))
    return Spec(draw(st.integers(1, 10)), tuple(rounds), abort_at)


def build_script(spec: Spec, cc: CharCodec) -> tuple[dict, bool]:
    """The scripted streams of ``spec`` and whether it is a clean trace (ends with EOS)."""
    enc, tags = cc.encode, cc.tags
    script: dict = {}
    trunk: list[int] = []
    clean = True
    for r, (plans, branches) in enumerate(spec.rounds):
        trunk.append(tags[Tag.GUIDELINE])
        for k in range(plans):
            trunk += [tags[Tag.PLAN], *enc(f"{k + 1}: p"), tags[Tag.PLAN_END]]
        script[(r,)] = [*trunk, tags[Tag.GUIDELINE_END]]
        if not 1 <= plans <= 5:
            return script, False
        for k, (n, fail) in enumerate(branches):
            body = enc(" " + "b" * n)
            script[(r, k)] = {
                "ok": [*body, tags[Tag.STEP_END]],
                "eos": body,  # the hook samples EOS after the script
                "nested": [*body, tags[Tag.GUIDELINE]],
                "cap": enc("c" * 40),
            }[fail]
            clean &= fail == "ok"
        if not clean:
            return script, False
        trunk = [*enc("t"), tags[Tag.TAKEAWAY_END]]
    script[(len(spec.rounds),)] = [*trunk, *enc("a"), EOS_ID]
    return script, True


@pytest.fixture(scope="module")
def stress_model():
    cc = CharCodec()
    return cc, tiny_qwen3(cc.vocab_size, layers=1, hidden=16, seed=9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(specs(), min_size=1, max_size=5),
    capacity=st.sampled_from([50, 100, 200, 4000]),  # in tokens
    block_size=st.sampled_from([1, 2, 4, 8]),
)
def test_cache_invariants_under_random_fork_join_finish_abort(stress_model, batch, capacity, block_size):
    stats, outputs = drive(*stress_model, batch, capacity, block_size)
    event(f"preempted={stats.preemptions > 0}")
    for out in outputs.values():
        event(f"finish={out.finish_reason.value}")
        event(f"joins={sum(f.takeaway is not None for f in out.forks)}")


@pytest.mark.parametrize("seed", range(6))
def test_cache_invariants_soak(stress_model, seed: int) -> None:
    """Heavier seeded traffic than hypothesis's shrink-friendly draws: many requests, tight pools."""
    rng = random.Random(seed)
    batch = []
    for _ in range(rng.randint(4, 8)):
        rounds = []
        for _ in range(rng.randint(1, 3)):
            plans = rng.choice([1, 2, 3, 4, 5, 5, 6])
            branches = tuple((rng.randint(0, 8), rng.choice(FAILS)) for _ in range(min(plans, 5)))
            rounds.append((plans, branches))
        batch.append(Spec(rng.randint(1, 10), tuple(rounds), rng.choice([None, None, rng.randint(1, 80)])))
    stats, outputs = drive(
        *stress_model, batch, capacity=rng.choice([120, 200, 300]), block_size=rng.choice([1, 4, 8])
    )
    print(seed, stats, sorted(o.finish_reason.value for o in outputs.values()))


def drive(cc: CharCodec, model, batch: list[Spec], capacity: int, block_size: int):
    """Run ``batch`` step by step (aborting as scheduled), checking the cache after every step."""
    engine = Engine(
        model,
        cc.codec(),
        cc.tags,
        EngineConfig(
            num_blocks=capacity // block_size,
            block_size=block_size,
            admission_watermark=1,
            check_invariants=True,
        ),
    )
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=400, max_branch_tokens=20)
    clean = {}
    for i, spec in enumerate(batch):
        script, clean[f"r{i}"] = build_script(spec, cc)
        prompt = cc.encode("q" * spec.prompt_len)
        engine.add_request(Request(f"r{i}", prompt, params, logits_hook=ScriptHook(script)))
    outputs = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for i, spec in enumerate(batch):
            if spec.abort_at == steps:
                engine.abort(f"r{i}")
        for out in engine.step():  # check_invariants runs inside every step
            outputs[out.request_id] = out
        assert steps < 5000
    engine.check()
    assert engine.pool.num_free == engine.pool.num_blocks  # nothing held when all requests end
    assert set(outputs) == {f"r{i}" for i in range(len(batch))}
    for rid, out in outputs.items():
        if out.finish_reason in (R.ABORTED, R.KV_CAPACITY):
            continue
        assert (out.finish_reason is R.EOS) == clean[rid], (rid, out.finish_reason, out.finish_detail)
        if clean[rid]:
            assert out.structure_errors(cc.tags, cc.decode) == []
            assert out.prefill_tokens == out.prompt_len + sum(out.inserted)
    return engine.stats, outputs


def test_preemption_restarts_give_identical_outputs() -> None:
    """A pool too small for the batch preempts requests; their outputs equal an unconstrained run."""
    cc = CharCodec()
    model = tiny_qwen3(cc.vocab_size, layers=1, hidden=16, seed=2)
    guideline = [cc.tags[Tag.GUIDELINE]]
    for k in range(3):
        guideline += [cc.tags[Tag.PLAN], *cc.encode(f"{k + 1}: x"), cc.tags[Tag.PLAN_END]]
    script = {(0,): [*guideline, cc.tags[Tag.GUIDELINE_END]]}  # then branches sample freely
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=60, top_k=20)

    def run(num_blocks: int):
        engine = Engine(model, cc.codec(), cc.tags, EngineConfig(num_blocks=num_blocks, block_size=4))
        reqs = [
            Request(f"p{i}", cc.encode(f"prompt {i}\n"), params, logits_hook=ScriptHook(script, after=None))
            for i in range(4)
        ]
        return engine.generate(reqs), engine.stats

    big, big_stats = run(1000)
    small, small_stats = run(40)
    assert big_stats.preemptions == 0 and small_stats.preemptions > 0
    for a, b in zip(big, small, strict=True):
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True) if x is not None) < 1e-5
