"""Toy problems and their reference solutions."""

from __future__ import annotations

import random

import pytest

from npr_pipelines.data.problems import Problem
from npr_pipelines.structure import format_score_v2, last_boxed, parse_text, render, validate
from npr_pipelines.toy.problems import (
    CANDIDATE_SEARCH,
    DEV,
    SPLITS,
    SUM_OF_PRODUCTS,
    TEST,
    TRAIN,
    ProblemConfig,
    generate_problems,
    make_problem,
    search_parts,
    split_of,
)
from npr_pipelines.toy.solutions import (
    CORRUPTIONS,
    TeacherNoise,
    corrupt,
    parallel_solution,
    parallel_trace,
    sample_noise,
    sequential_solution,
    teacher_answer,
)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(TRAIN, 300, seed=3) + generate_problems(TEST, 100, seed=3)


def test_generation_is_deterministic():
    assert generate_problems(TRAIN, 50, seed=7) == generate_problems(TRAIN, 50, seed=7)
    assert generate_problems(TEST, 50, seed=7) == generate_problems(TEST, 50, seed=7)
    assert generate_problems(TRAIN, 50, seed=7) != generate_problems(TRAIN, 50, seed=8)
    # a longer list extends a shorter one (a stream, not a resample)
    assert generate_problems(DEV, 40, seed=1)[:20] == generate_problems(DEV, 20, seed=1)


def test_splits_never_overlap_and_are_seed_independent():
    by_split = {s: generate_problems(s, 400, seed=s_i) for s_i, s in enumerate(SPLITS)}
    keys = {s: {p.canonical for p in ps} for s, ps in by_split.items()}
    assert keys[TRAIN].isdisjoint(keys[DEV])
    assert keys[TRAIN].isdisjoint(keys[TEST])
    assert keys[DEV].isdisjoint(keys[TEST])
    for split, ps in by_split.items():
        assert all(p.split == split for p in ps)
        assert len({p.id for p in ps}) == len(ps)  # distinct within a split
    # membership is a function of the canonical problem only
    other_seed = generate_problems(TEST, 400, seed=99)
    assert all(split_of(p.family, p.operands) == TEST for p in other_seed)


def test_split_shares_match_config():
    cfg = ProblemConfig()
    rng = random.Random(0)
    counts = dict.fromkeys(SPLITS, 0)
    for _ in range(20000):
        ops = [rng.randint(2, 9) for _ in range(6)]
        counts[split_of(SUM_OF_PRODUCTS, ops, cfg)] += 1
    for name, permille in cfg.split_permille:
        assert abs(counts[name] / 20000 - permille / 1000) < 0.01


def test_answers_are_exact(problems):
    for p in problems:
        assert p.source == f"toy/{p.family}"
        assert 2 <= p.k <= 5
        if p.family == SUM_OF_PRODUCTS:
            expr = p.question.removeprefix("Compute ").removesuffix(".")
            assert str(eval(expr)) == p.answer  # the question is a plain arithmetic expression
            assert expr.count("*") == p.k
        else:
            a, b, t, x, cands = search_parts(p.operands)
            assert p.answer == str(x)
            assert [c for c in cands if a * c + b == t] == [x]  # exactly one candidate fits
            assert len(set(cands)) == len(cands) == p.k
            assert p.question == "Find x in {" + ",".join(map(str, cands)) + f"}} with {a}*x+{b}={t}."


def test_family_and_k_restrictions():
    ps = generate_problems(TRAIN, 60, seed=0, families=[CANDIDATE_SEARCH], k_values=[4])
    assert {(p.family, p.k) for p in ps} == {(CANDIDATE_SEARCH, 4)}
    with pytest.raises(ValueError):
        ProblemConfig(k_values=(2, 6), k_weights=(0.5, 0.5))


def test_to_problem_has_the_shared_fields(problems):
    p = problems[0].to_problem()
    assert isinstance(p, Problem)
    assert (p.id, p.question, p.answer, p.source) == (
        problems[0].id,
        problems[0].question,
        problems[0].answer,
        problems[0].source,
    )


def test_sequential_and_parallel_solutions_are_right(problems):
    for p in problems:
        seq = sequential_solution(p)
        par = parallel_solution(p)
        assert seq.splitlines()[-1] == f"\\boxed{{{p.answer}}}"
        assert par.splitlines()[-1] == f"\\boxed{{{p.answer}}}"
        assert last_boxed(seq) == last_boxed(par) == p.answer
        assert "<" not in seq  # no tags in the sequential format
        verdict = validate(parse_text(par), max_plans=5)
        assert verdict.valid, verdict.reasons
        assert format_score_v2(par) == 0.0
        trace = parallel_trace(p)
        assert len(trace.blocks) == 1 and len(trace.blocks[0].plans) == p.k
        assert parse_text(par).to_trace() == trace
        assert render(trace) == par


def test_search_branches_finish_at_different_lengths(problems):
    searches = [p for p in problems if p.family == CANDIDATE_SEARCH]
    uneven = [p for p in searches if len({len(s.text) for s in parallel_trace(p).blocks[0].steps}) > 1]
    assert len(uneven) > len(searches) // 2
    # the sequential solver stops at the first fit, the parallel one tests every candidate
    for p in searches:
        cands = search_parts(p.operands)[4]
        tested = [line for line in sequential_solution(p).splitlines() if line.startswith("x=")]
        assert len(tested) == cands.index(int(p.answer)) + 1


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_solutions_fail_the_validator(problems, kind):
    for p in problems[:80]:
        bad = corrupt(parallel_solution(p), kind)
        assert not validate(parse_text(bad)).valid, (kind, bad)


def test_noisy_teacher_is_consistent(problems):
    rng = random.Random(0)
    flipped = 0
    for p in problems:
        noise = sample_noise(p, rng)
        wrong = teacher_answer(p, noise)
        assert last_boxed(sequential_solution(p, noise)) in {wrong, p.answer}
        assert last_boxed(parallel_solution(p, noise)) == wrong
        assert validate(parse_text(parallel_solution(p, noise))).valid  # noise is arithmetic, not format
        if p.family == SUM_OF_PRODUCTS:
            assert wrong != p.answer
            assert last_boxed(sequential_solution(p, noise)) == wrong
        else:
            cands = search_parts(p.operands)[4]
            first_is_false = noise.index < cands.index(int(p.answer))
            assert (wrong != p.answer) == first_is_false
            flipped += first_is_false
    assert flipped > 0
    # an explicit case: product 2 off by +3
    p = make_problem(SUM_OF_PRODUCTS, (2, 3, 4, 5))
    assert sequential_solution(p, TeacherNoise(1, 3)) == "2*3=6\n4*5=23\n6+23=29\n\\boxed{29}"
