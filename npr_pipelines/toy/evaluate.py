"""A small evaluation helper for toy models: batched Hugging Face ``generate`` with a KV cache.

Sequential decoding only (the project's engine replaces this later). A response is *correct* when the
content of its last ``\\boxed{}`` equals the reference answer as a string (toy answers are integers),
and *format-valid* when the strict validator accepts ``parse_text(response)``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from npr_pipelines.structure import format_score_v2, last_boxed, parse_text, validate
from npr_pipelines.tokenization import PromptConfig, prompt_text
from npr_pipelines.toy.model import load_model
from npr_pipelines.toy.problems import ToyProblem
from npr_pipelines.toy.tokenizer import TOY_PROMPT


@dataclass(frozen=True)
class Sample:
    problem_id: str
    response: str
    n_tokens: int
    finished: bool  # ended with eos (not cut by max_new_tokens)
    correct: bool
    format_valid: bool
    format_score: float
    parallel: bool  # the response opens a <guideline>


def is_correct(response: str, answer: str) -> bool:
    boxed = last_boxed(response)
    return boxed is not None and boxed.strip() == answer.strip()


def score_response(problem: ToyProblem, response: str, n_tokens: int = 0, finished: bool = True) -> Sample:
    return Sample(
        problem_id=problem.id,
        response=response,
        n_tokens=n_tokens,
        finished=finished,
        correct=is_correct(response, problem.answer),
        format_valid=validate(parse_text(response)).valid,
        format_score=format_score_v2(response),
        parallel="<guideline>" in response,
    )


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[tuple[str, int, bool]]:
    """``(text, n_tokens, finished)`` per prompt; ``temperature == 0`` means greedy decoding."""
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    out: list[tuple[str, int, bool]] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            list(prompts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if temperature > 0
            else {"do_sample": False}
        )
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            finished = eos in row
            ids = row[: row.index(eos)] if finished else row
            out.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids) + int(finished), finished))
    return out


def evaluate_toy(
    model_path: str | Path,
    problems: Sequence[ToyProblem],
    n_samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    *,
    top_p: float = 1.0,
    max_new_tokens: int = 320,
    batch_size: int = 256,
    prompt: PromptConfig = TOY_PROMPT,
    num_threads: int | None = 2,
    return_samples: bool = False,
) -> dict:
    """Sample ``n_samples`` responses per problem and report accuracy and format metrics.

    Returns ``accuracy``, ``format_valid_rate``, ``format_score_mean`` (V2), ``parallel_rate``
    (responses that open a ``<guideline>``), ``valid_and_correct_rate``, ``truncated_rate``,
    ``mean_response_tokens``, per-family and per-k accuracy, the settings, and the wall time; with
    ``return_samples`` also every ``Sample``.
    """
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        model = load_model(model_path)
        jobs = [p for p in problems for _ in range(n_samples)]
        prompts = [prompt_text(tokenizer, p.question, prompt) for p in jobs]
        outputs = generate_responses(
            model,
            tokenizer,
            prompts,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
        )
    finally:
        torch.set_num_threads(old_threads)
    samples = [score_response(p, text, n, fin) for p, (text, n, fin) in zip(jobs, outputs, strict=True)]
    n = max(1, len(samples))
    by_family: dict[str, list[bool]] = defaultdict(list)
    by_k: dict[int, list[bool]] = defaultdict(list)
    for p, s in zip(jobs, samples, strict=True):
        by_family[p.family].append(s.correct)
        by_k[p.k].append(s.correct)
    result = {
        "accuracy": sum(s.correct for s in samples) / n,
        "format_valid_rate": sum(s.format_valid for s in samples) / n,
        "format_score_mean": sum(s.format_score for s in samples) / n,
        "parallel_rate": sum(s.parallel for s in samples) / n,
        "valid_and_correct_rate": sum(s.correct and s.format_valid for s in samples) / n,
        "truncated_rate": sum(not s.finished for s in samples) / n,
        "mean_response_tokens": sum(s.n_tokens for s in samples) / n,
        "accuracy_by_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())},
        "accuracy_by_k": {str(k): sum(v) / len(v) for k, v in sorted(by_k.items())},
        "n_problems": len(problems),
        "n_samples": n_samples,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    if return_samples:
        result["samples"] = samples
    return result
