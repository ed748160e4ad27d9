"""Sampling and scoring a checkpoint on a problem set with the NPR engine.

Every sample is kept (token ids, text, verdict with reasons, extracted answer, engine record) so a
person can see why an answer was graded wrong; ``summarize`` turns samples into the metrics of
DESIGN.md (accuracy = avg@n, format validity, V2 format score, trigger rate, critical-path ratio).
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from npr_pipelines.data import Problem
from npr_pipelines.engine import Engine, EngineConfig, EngineOutput, Request, SamplingParams, TokenCodec
from npr_pipelines.eval.grading import grade
from npr_pipelines.eval.metrics import inter_run_std, intra_problem_std, mean_pass_at_k
from npr_pipelines.eval.speedup import median_latency, tokens_per_second
from npr_pipelines.structure import TagVocab, format_score_v2, parse_text, validate
from npr_pipelines.tokenization import PromptConfig, has_tag_tokens, prompt_ids


@dataclass(frozen=True)
class EvalConfig:
    """Decoding and scoring settings. Paper: n = 8, T = 1.0, top-p 0.7 (``method.md`` §5.2)."""

    mode: str = "sequential"  # "sequential" | "parallel"
    n_samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = 0
    max_new_tokens: int = 30_000
    max_total_tokens: int | None = None
    seed: int = 0
    answer_type: str = "math"
    pass_ks: tuple[int, ...] = (1,)
    num_blocks: int = 4096
    block_size: int = 16


@dataclass
class SampleRecord:
    problem_id: str
    sample: int
    response_ids: list[int]
    text: str
    extracted: str | None
    correct: bool
    format_valid: bool
    violations: list[str]
    format_score: float
    triggered: bool
    rounds: int
    plans_per_guideline: list[int]
    total_tokens: int
    critical_path_tokens: int
    finish_reason: str
    latency_s: float
    inserted: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_seed(seed: int, problem_id: str, sample: int) -> int:
    """A stable per-(problem, sample) seed, independent of batch composition and order."""
    digest = hashlib.sha256(f"{seed}:{problem_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sampling_params(config: EvalConfig, problem_id: str, sample: int) -> SamplingParams:
    """The decoding settings of one (problem, sample) request, with its stable seed."""
    return SamplingParams(
        mode=config.mode,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_tokens=config.max_new_tokens,
        max_total_tokens=config.max_total_tokens,
        seed=sample_seed(config.seed, problem_id, sample),
    )


def score_output(
    problem: Problem, sample: int, out: EngineOutput, codec: TokenCodec, answer_type: str = "math"
) -> SampleRecord:
    """Grade one engine output. Validity uses the text-level parser, which reads tags whether they are
    single tokens (stages 2-3) or character sequences (base, NPR-Zero)."""
    ids = list(out.response_ids)
    while ids and ids[-1] in codec.eos_token_ids:
        ids.pop()
    text = codec.decode(ids)
    table = parse_text(text)
    verdict = validate(table)
    graded = grade(text, problem.answer, answer_type=answer_type)
    return SampleRecord(
        problem_id=problem.id,
        sample=sample,
        response_ids=list(out.response_ids),
        text=text,
        extracted=graded.extracted,
        correct=graded.correct,
        format_valid=verdict.valid,
        violations=verdict.reasons,
        format_score=format_score_v2(text),
        triggered=out.triggered,
        rounds=len(table.blocks),
        plans_per_guideline=[len(b.plans) for b in table.blocks],
        total_tokens=out.total_tokens,
        critical_path_tokens=out.critical_path_tokens,
        finish_reason=str(out.finish_reason),
        latency_s=out.latency_s,
        inserted=list(out.inserted),
    )


def engine_parts(tokenizer, config: EvalConfig) -> tuple[TokenCodec, TagVocab | None, EngineConfig]:
    """What an engine (or a pool of engine replicas) over ``tokenizer`` needs besides the model: the
    codec, the tag vocabulary (None without tag tokens) and the KV cache settings of ``config``."""
    tags = TagVocab.from_tokenizer(tokenizer) if has_tag_tokens(tokenizer) else None
    return (
        TokenCodec.from_tokenizer(tokenizer),
        tags,
        EngineConfig(num_blocks=config.num_blocks, block_size=config.block_size),
    )


def build_engine(model, tokenizer, config: EvalConfig) -> Engine:
    codec, tags, engine_config = engine_parts(tokenizer, config)
    if config.mode == "parallel" and tags is None:
        raise ValueError("parallel mode needs the tag tokens in the tokenizer (a stage-2+ checkpoint)")
    return Engine(model, codec, tags, engine_config)


def evaluate_problems(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: EvalConfig,
    prompt: PromptConfig | None = None,
    engine: Engine | None = None,
    done: Callable[[list[SampleRecord]], None] | None = None,
    chunk: int = 64,
) -> tuple[list[SampleRecord], float]:
    """Decode ``n_samples`` per problem (all requests in flight) and grade them.

    Returns the records (problem order, then sample) and the wall-clock seconds of decoding.
    ``done`` is called after each chunk of problems (for progress and resumable evaluation).
    """
    engine = engine or build_engine(model, tokenizer, config)
    codec = TokenCodec.from_tokenizer(tokenizer)
    records: list[SampleRecord] = []
    wall = 0.0
    for start in range(0, len(problems), chunk):
        part = problems[start : start + chunk]
        requests = []
        for p in part:
            ids = prompt_ids(tokenizer, p.question, prompt)
            for s in range(config.n_samples):
                requests.append(Request(f"{p.id}#{s}", ids, sampling_params(config, p.id, s)))
        t0 = time.perf_counter()
        outputs = engine.generate(requests)
        wall += time.perf_counter() - t0
        new = [
            score_output(p, s, outputs[i * config.n_samples + s], codec, config.answer_type)
            for i, p in enumerate(part)
            for s in range(config.n_samples)
        ]
        records.extend(new)
        if done is not None:
            done(new)
    return records, wall


def measure_latency(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: EvalConfig,
    prompt: PromptConfig | None = None,
    engine: Engine | None = None,
) -> list[float]:
    """Per-request wall-clock seconds at concurrency 1: each problem's sample 0 (same seed as in
    ``evaluate_problems``) decoded alone, one request after the other. One float per problem, in order."""
    engine = engine or build_engine(model, tokenizer, config)
    latencies: list[float] = []
    for p in problems:
        ids = prompt_ids(tokenizer, p.question, prompt)
        request = Request(f"{p.id}#latency", ids, sampling_params(config, p.id, 0))
        t0 = time.perf_counter()
        engine.generate([request])
        latencies.append(time.perf_counter() - t0)
    return latencies


def correctness_matrix(records: Sequence[SampleRecord]) -> list[list[bool]] | None:
    """Samples x problems correctness (row s = every problem's sample s, problems in first-seen order),
    or None unless every problem has the same sample indices."""
    by_problem: dict[str, dict[int, bool]] = {}
    for r in records:
        by_problem.setdefault(r.problem_id, {})[r.sample] = r.correct
    samples = {tuple(sorted(v)) for v in by_problem.values()}
    if len(samples) != 1:
        return None
    (indices,) = samples
    return [[by_problem[pid][s] for pid in by_problem] for s in indices]


def summarize(records: Sequence[SampleRecord], pass_ks: Sequence[int] = (1,)) -> dict[str, float | None]:
    """Metrics over samples: accuracy (avg@n), pass@k, validity, V2 score, trigger rate, structure.

    With n > 1 samples for every problem (the same sample indices each), also pass@n, ``inter_run_std``
    (std over the n runs of each run's accuracy) and ``intra_problem_std`` (``method.md`` §5.4).
    """
    if not records:
        return {}
    by_problem: dict[str, list[SampleRecord]] = {}
    for r in records:
        by_problem.setdefault(r.problem_id, []).append(r)
    counts = [(len(rs), sum(r.correct for r in rs)) for rs in by_problem.values()]
    n = len(records)
    out: dict[str, float | None] = {
        "n_problems": float(len(by_problem)),
        "n_samples": float(n),
        "accuracy": sum(r.correct for r in records) / n,
        "format_valid_rate": sum(r.format_valid for r in records) / n,
        "format_score_mean": sum(r.format_score for r in records) / n,
        "trigger_rate": sum(r.triggered for r in records) / n,
        "mean_total_tokens": statistics.fmean(r.total_tokens for r in records),
        "mean_critical_path_tokens": statistics.fmean(r.critical_path_tokens for r in records),
    }
    triggered = [r for r in records if r.triggered and r.critical_path_tokens]
    out["mean_critical_path_ratio"] = (
        statistics.fmean(r.total_tokens / r.critical_path_tokens for r in triggered) if triggered else None
    )
    plans = [k for r in records for k in r.plans_per_guideline]
    out["plans_per_guideline"] = statistics.fmean(plans) if plans else None
    out["rounds_per_trace"] = statistics.fmean(r.rounds for r in records)
    matrix = correctness_matrix(records)
    ks = set(pass_ks)
    if matrix is not None and len(matrix) > 1:
        ks.add(len(matrix))
        out["inter_run_std"] = inter_run_std(matrix)
        out["intra_problem_std"] = intra_problem_std(matrix)
    for k in sorted(ks):
        if all(c[0] >= k for c in counts):
            out[f"pass_at_{k}"] = mean_pass_at_k(counts, k)
    return out


def mode_summary(
    records: Sequence[SampleRecord],
    wall_s: float,
    latencies_s: Sequence[float] = (),
    pass_ks: Sequence[int] = (1,),
) -> dict[str, Any]:
    """One mode's summary: ``summarize`` plus decoding time and speed. ``wall_time_s`` (s) decoded every
    record with all prompts in flight; ``tokens_per_s`` = all branches' tokens / ``wall_time_s``;
    ``latencies_s`` are per-request seconds at concurrency 1 (``measure_latency``), with their median."""
    return {
        **summarize(records, pass_ks),
        "wall_time_s": wall_s,
        "tokens_per_s": tokens_per_second(sum(r.total_tokens for r in records), wall_s),
        "latencies_s": list(latencies_s),
        "latency_median_s": median_latency(latencies_s),
    }
