"""Stage-2 self-distillation: rejection sampling with the NPR-Zero policy, the SFT corpus, its re-check.

Rejection sampling (``method.md`` §3.1): every problem gets up to ``max_tries`` samples from the policy,
decoded sequentially (NPR-Zero only *simulates* parallelism in text) at T = 1; the FIRST sample that is
both correct and format-perfect (strict validator passes AND the V2 format score is exactly 0) is kept
and the problem retires. Problems are processed as a rolling pool of ``batch_size`` problems in flight
(continuous batching: a rejected try is followed at once by the problem's next try, a settled problem
by a new one). Every attempt is recorded with its verdict, V2 score and reasons in ``attempts.jsonl``,
appended with one write per ``batch_size`` finished attempts. Each (problem, try) has its own seed, so
a restart that skips the problems already settled in the log (and re-runs the tries that were in
flight) produces exactly the result an uninterrupted run would have.

The corpus (``build_corpus``) de-duplicates the accepted traces and removes anything that overlaps a
held-out question. ``retokenize_trace`` is the one place where text is re-tokenised (DESIGN.md: NPR-Zero's
text traces become stage-2 token ids once, with the 8 tags as single tokens, split exactly as the engine
splits them); ``recheck_corpus`` verifies a corpus independently at token level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from npr_pipelines.engine import Engine, EngineConfig, LogitsHook, Request, SamplingParams, TokenCodec
from npr_pipelines.eval.grading import grade
from npr_pipelines.eval.runner import sample_seed, score_output
from npr_pipelines.structure import (
    LayoutError,
    TagVocab,
    encode_trace,
    format_score_v2,
    lex_tokens,
    parse_text,
    parse_tokens,
    validate,
)
from npr_pipelines.structure.tags import TAGS
from npr_pipelines.tokenization import PromptConfig, has_tag_tokens, prompt_ids
from npr_pipelines.training.overrides import apply_stage_values

ATTEMPTS_FILE = "attempts.jsonl"
CONFIG_FILE = "rejection_config.json"

#: The acceptance rule, stated once (it goes into every report).
ACCEPTANCE_RULE = (
    "first of <= max_tries sequential samples (T, top-p as configured) that ends with EOS, whose final "
    "\\boxed{} answer grades correct, whose strict validator verdict is valid, and whose V2 format score "
    "is exactly 0"
)


class ProblemLike(Protocol):
    id: str
    question: str
    answer: str


@dataclass(frozen=True)
class RejectionConfig:
    """Rejection-sampling settings. Defaults are the paper's (``method.md`` §3.1): k = 8 tries, T = 1,
    top-p = 1, 32k new tokens, a rolling pool of 1,024 problems.

    ``batch_size`` (problems in flight), the engine sizes and ``num_threads`` do not change the result;
    every other field does, and a resumed run must use the same values.
    """

    max_tries: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32_768
    batch_size: int = 1024
    seed: int = 521
    prompt: PromptConfig = field(default_factory=PromptConfig)
    answer_type: str = "math"
    num_blocks: int = 8192
    block_size: int = 16
    num_threads: int | None = None  # torch threads while sampling (None: leave as is)

    #: Fields that do not influence which traces are accepted.
    RESULT_NEUTRAL = ("batch_size", "num_blocks", "block_size", "num_threads")

    def __post_init__(self) -> None:
        if self.max_tries < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("max_tries, batch_size and max_new_tokens must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_key(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.RESULT_NEUTRAL}

    def with_stage_values(self, values: Any) -> RejectionConfig:
        """Overrides from another config object (e.g. a toy profile entry): every field of ``values``
        whose name is a field here (same convention as ``RLConfig.with_stage_values``)."""
        return apply_stage_values(self, values)


@dataclass
class RejectionResult:
    """``accepted``: corpus candidates in problem order; ``outcomes``: problem id -> final outcome."""

    accepted: list[dict[str, Any]]
    outcomes: dict[str, dict[str, Any]]
    attempts_path: Path
    summary: dict[str, Any]


# --- the attempt log ---------------------------------------------------------------------------------


def _append_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows with ONE write + fsync: a crash leaves at most a torn last line, dropped on read."""
    if not rows:
        return
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_attempts(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete attempt record in ``workdir`` (a torn trailing line is cut off the file)."""
    path = Path(workdir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in raw[:end].decode().splitlines() if line.strip()]


def _check_config(workdir: Path, config: RejectionConfig) -> None:
    path = workdir / CONFIG_FILE
    key = config.result_key()
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != json.loads(json.dumps(key)):
            raise ValueError(
                f"{workdir} holds rejection sampling with a different config: {stored} != {key}; "
                "use a fresh working directory"
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
    tmp.rename(path)


def _outcomes(attempts: Iterable[Mapping[str, Any]], max_tries: int) -> dict[str, dict[str, Any]]:
    """Per problem: tries so far and, once settled, ``status`` accepted/exhausted (else ``open``)."""
    out: dict[str, dict[str, Any]] = {}
    for a in sorted(attempts, key=lambda a: (a["problem_id"], a["try"])):
        o = out.setdefault(a["problem_id"], {"status": "open", "tries": 0, "accepted_try": None})
        if o["status"] != "open" or a["try"] != o["tries"]:
            continue  # after a final outcome, or after a gap: cannot be in a log we wrote; ignored
        o["tries"] = a["try"] + 1
        if a["accepted"]:
            o["status"], o["accepted_try"] = "accepted", a["try"]
        elif o["tries"] >= max_tries:
            o["status"] = "exhausted"
    return out


# --- sampling ----------------------------------------------------------------------------------------


def judge(record: Any, reference: str, finish_reason: str) -> tuple[bool, list[str]]:
    """Acceptance of one scored sample (``eval.runner.SampleRecord``) and every reason against it."""
    reasons: list[str] = []
    if finish_reason != "eos":
        reasons.append(f"truncated: finish reason {finish_reason}")
    if not record.correct:
        reasons.append(f"incorrect: extracted {record.extracted!r}, reference {reference!r}")
    reasons += [f"invalid: {r}" for r in record.violations]
    if record.format_score != 0.0:
        reasons.append(f"format_score: V2 = {record.format_score:g}")
    return not reasons, reasons


def run_rejection_sampling(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: Sequence[ProblemLike],
    config: RejectionConfig,
    workdir: str | os.PathLike,
    *,
    engine: Engine | None = None,
    logits_hook: Callable[[str, int], LogitsHook | None] | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> RejectionResult:
    """Rejection-sample ``problems`` with the policy ``model`` (sequential decoding), resumably.

    ``workdir`` holds the attempt log; problems already settled there are skipped. ``logits_hook``
    (``(problem_id, try) -> hook``) constrains decoding per attempt (scripted tests). ``on_batch``
    receives progress after every appended batch of attempts.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_config(workdir, config)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids must be unique")
    by_id = {p.id: p for p in problems}
    path = workdir / ATTEMPTS_FILE
    outcomes = _outcomes(read_attempts(workdir), config.max_tries)
    resumed_attempts = sum(o["tries"] for pid, o in outcomes.items() if pid in by_id)

    old_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    t0 = time.perf_counter()
    batches = new_attempts = new_tokens = 0
    try:
        codec = TokenCodec.from_tokenizer(tokenizer)
        if engine is None:
            tags = TagVocab.from_tokenizer(tokenizer) if has_tag_tokens(tokenizer) else None
            engine = Engine(
                model,
                codec,
                tags,
                EngineConfig(
                    num_blocks=config.num_blocks,
                    block_size=config.block_size,
                    max_running=config.batch_size,
                ),
            )
        prompts: dict[str, list[int]] = {}
        queue = deque(p for p in problems if outcomes.get(p.id, {}).get("status", "open") == "open")
        in_flight: dict[str, tuple[ProblemLike, int, int]] = {}  # request id -> (problem, try, seed)
        pending: list[dict[str, Any]] = []

        def submit(p: ProblemLike) -> None:
            t = outcomes.get(p.id, {"tries": 0})["tries"]
            if p.id not in prompts:
                prompts[p.id] = prompt_ids(tokenizer, p.question, config.prompt)
            seed = sample_seed(config.seed, p.id, t)
            params = SamplingParams(
                mode="sequential",
                temperature=config.temperature,
                top_p=config.top_p,
                seed=seed,
                max_tokens=config.max_new_tokens,
            )
            hook = logits_hook(p.id, t) if logits_hook is not None else None
            rid = f"{p.id}#{t}"
            in_flight[rid] = (p, t, seed)
            engine.add_request(Request(rid, prompts[p.id], params, hook))

        def fill() -> None:
            while queue and len(in_flight) < config.batch_size:
                submit(queue.popleft())

        fill()
        # Continuous batching: a problem's next try is submitted as soon as its previous one is
        # rejected, so the engine never idles waiting for the longest sample of a batch.
        while in_flight:
            for out in engine.step():
                if out.request_id not in in_flight:
                    continue  # another caller's request on a shared engine
                p, t, seed = in_flight.pop(out.request_id)
                scored = score_output(p, t, out, codec, config.answer_type)
                accepted, reasons = judge(scored, p.answer, str(out.finish_reason))
                pending.append(
                    {
                        "problem_id": p.id,
                        "try": t,
                        "seed": seed,
                        "accepted": accepted,
                        "verdict": "accepted" if accepted else "rejected",
                        "correct": scored.correct,
                        "format_valid": scored.format_valid,
                        "format_score": scored.format_score,
                        "reasons": reasons,
                        "extracted": scored.extracted,
                        "reference": p.answer,
                        "text": scored.text,
                        "response_tokens": len(out.response_ids),
                        "finish_reason": str(out.finish_reason),
                        "batch": batches,
                    }
                )
                new_tokens += len(out.response_ids)
                o = outcomes.setdefault(p.id, {"status": "open", "tries": 0, "accepted_try": None})
                o["tries"] = t + 1
                if accepted:
                    o["status"], o["accepted_try"] = "accepted", t
                elif o["tries"] >= config.max_tries:
                    o["status"] = "exhausted"
                else:
                    submit(p)
            fill()
            if pending and (len(pending) >= config.batch_size or not in_flight):
                _append_jsonl(path, pending)
                batches += 1
                new_attempts += len(pending)
                if on_batch is not None:
                    on_batch(
                        {
                            "batch": batches,
                            "attempts": new_attempts,
                            "accepted_in_batch": sum(r["accepted"] for r in pending),
                            "open": len(in_flight) + len(queue),
                            "elapsed_s": time.perf_counter() - t0,
                        }
                    )
                pending = []
    finally:
        torch.set_num_threads(old_threads)
    wall = time.perf_counter() - t0
    return _result(problems, workdir, config, wall, new_attempts, new_tokens, resumed_attempts)


def _result(
    problems: Sequence[ProblemLike],
    workdir: Path,
    config: RejectionConfig,
    wall: float,
    new_attempts: int,
    new_tokens: int,
    resumed_attempts: int,
) -> RejectionResult:
    attempts = [a for a in read_attempts(workdir)]
    wanted = {p.id for p in problems}
    attempts = [a for a in attempts if a["problem_id"] in wanted]
    outcomes = _outcomes(attempts, config.max_tries)
    chosen = {(a["problem_id"], a["try"]): a for a in attempts if a["accepted"]}
    accepted = []
    for p in problems:
        o = outcomes.get(p.id)
        if o is None or o["status"] != "accepted":
            continue
        a = chosen[(p.id, o["accepted_try"])]
        accepted.append(
            {
                "problem_id": p.id,
                "question": p.question,
                "answer": p.answer,
                "source": getattr(p, "source", ""),
                "text": a["text"],
                "tries": o["tries"],
                "seed": a["seed"],
                "format_score": a["format_score"],
                "response_tokens": a["response_tokens"],
            }
        )
    reasons: Counter[str] = Counter()
    for a in attempts:
        for r in a["reasons"]:
            reasons[r.split(":", 1)[0] if not r.startswith("invalid:") else ":".join(r.split(":")[:2])] += 1
    n = len(problems)
    settled = [o for pid, o in outcomes.items() if o["status"] != "open"]
    summary = {
        "rule": ACCEPTANCE_RULE,
        "config": config.to_dict(),
        "offered": n,
        "settled": len(settled),
        "accepted": len(accepted),
        "exhausted": sum(o["status"] == "exhausted" for o in settled),
        "acceptance_rate": len(accepted) / n if n else 0.0,
        "attempts": len(attempts),
        "attempt_acceptance_rate": len(accepted) / len(attempts) if attempts else 0.0,
        "mean_tries_accepted": (sum(r["tries"] for r in accepted) / len(accepted)) if accepted else None,
        "accepted_by_try": dict(sorted(Counter(r["tries"] for r in accepted).items())),
        "correct_rate": sum(a["correct"] for a in attempts) / len(attempts) if attempts else 0.0,
        "format_valid_rate": sum(a["format_valid"] for a in attempts) / len(attempts) if attempts else 0.0,
        "rejection_reasons": dict(reasons.most_common()),
        "resumed_attempts": resumed_attempts,
        "new_attempts": new_attempts,
        "new_tokens": new_tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(new_tokens / wall, 1) if wall > 0 else None,
    }
    return RejectionResult(accepted, outcomes, workdir / ATTEMPTS_FILE, summary)


# --- the corpus --------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")

#: The corpus selection rule, stated in every corpus report.
CORPUS_RULE = (
    "every accepted trace (" + ACCEPTANCE_RULE + "), in problem order; the first row wins per problem id "
    "and per normalised question (NFKC, case-folded, whitespace and trailing . ? ! removed); rows "
    "whose id or normalised question matches a held-out question are removed; no other selection"
)


def normalize_question(question: str) -> str:
    """The key used for duplicate and overlap checks."""
    return _WS.sub("", unicodedata.normalize("NFKC", question).casefold()).rstrip(".?!")


def build_corpus(
    accepted: Sequence[Mapping[str, Any]], held_out: Iterable[Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """De-duplicate accepted traces and drop every overlap with ``held_out``.

    ``held_out``: problems (anything with ``question``, optionally ``id``) or question strings from every
    held-out benchmark. Returns the rows and a report stating the rule and what each step removed.
    """
    held_q: set[str] = set()
    held_ids: set[str] = set()
    for h in held_out:
        if isinstance(h, str):
            held_q.add(normalize_question(h))
        else:
            held_q.add(normalize_question(h["question"] if isinstance(h, Mapping) else h.question))
            pid = h.get("id") if isinstance(h, Mapping) else getattr(h, "id", None)
            if pid is not None:
                held_ids.add(str(pid))
    rows: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    seen_q: set[str] = set()
    dropped = Counter()
    for row in accepted:
        pid, q = str(row["problem_id"]), normalize_question(row["question"])
        if pid in held_ids or q in held_q:
            dropped["held_out_overlap"] += 1
        elif pid in seen_ids:
            dropped["duplicate_id"] += 1
        elif q in seen_q:
            dropped["duplicate_question"] += 1
        else:
            seen_ids.add(pid)
            seen_q.add(q)
            rows.append(dict(row))
    report = {
        "rule": CORPUS_RULE,
        "candidates": len(accepted),
        "rows": len(rows),
        "held_out_questions": len(held_q),
        "dropped": {k: dropped.get(k, 0) for k in ("duplicate_id", "duplicate_question", "held_out_overlap")},
    }
    return rows, report


def retokenize_trace(text: str, tokenizer: Any, vocab: TagVocab | None = None) -> list[int]:
    """Stage-2 token ids of a text trace (EOS not included): the one re-tokenisation of the method.

    The text is parsed and its trace re-encoded with ``encode_trace``: tags become single tokens and
    every step header is split off as the engine inserts it, so the ids equal what the engine would
    produce for the same trace. Raises ``ValueError`` (with the validator's reasons) for a trace that
    is not strictly valid, since its structure cannot be carried over faithfully.
    """
    vocab = vocab or TagVocab.from_tokenizer(tokenizer)
    table = parse_text(text)
    verdict = validate(table)
    if not verdict.valid:
        raise ValueError("trace is not valid: " + "; ".join(verdict.reasons))
    return encode_trace(
        table.to_trace(), vocab, lambda s: list(tokenizer.encode(s, add_special_tokens=False))
    )


def recheck_corpus(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    prompt: PromptConfig | None = None,
    answer_type: str = "math",
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Independently re-check a corpus at token level; returns one failure per bad row (empty = all pass).

    Per row, with a tokenizer that has the 8 tag tokens: re-tokenise (``retokenize_trace``), then on the
    ids: the token-level parse + strict validator pass, every tag is one token and no tag string hides in
    text, the SFT parallel layout accepts prompt + response, the decoded text has V2 score 0, re-parses
    to the same trace and grades correct against the row's answer; optionally the length fits.
    """
    from npr_pipelines.training.batch import sft_sequence

    vocab = TagVocab.from_tokenizer(tokenizer)

    def encode(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False))

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False)

    failures = []
    for i, row in enumerate(rows):
        reasons: list[str] = []
        missing = [k for k in ("problem_id", "question", "answer", "text") if not row.get(k)]
        if missing:
            failures.append(
                {"index": i, "problem_id": row.get("problem_id"), "reasons": [f"missing {missing}"]}
            )
            continue
        try:
            ids = retokenize_trace(row["text"], tokenizer, vocab)
        except ValueError as exc:
            failures.append({"index": i, "problem_id": row["problem_id"], "reasons": [f"retokenize: {exc}"]})
            continue
        table = parse_tokens(ids, vocab, decode)
        verdict = validate(table)
        reasons += [f"token-level invalid: {r}" for r in verdict.reasons]
        for lex in lex_tokens(ids, vocab, decode):
            if lex.tag is None and any(t in lex.text for t in TAGS):
                reasons.append(f"tag string inside text tokens at {lex.start}: {lex.text[:40]!r}")
        p_ids = prompt_ids(tokenizer, row["question"], prompt)
        try:
            sft_sequence(p_ids, ids, layout="parallel", vocab=vocab, decode=decode, encode=encode)
        except (LayoutError, ValueError) as exc:
            reasons.append(f"parallel layout rejected: {exc}")
        text = decode(ids)
        score = format_score_v2(text)
        if score != 0.0:
            reasons.append(f"format_score: V2 = {score:g}")
        if parse_text(text).to_trace() != parse_text(row["text"]).to_trace():
            reasons.append("re-tokenised trace differs from the sampled one")
        graded = grade(text, str(row["answer"]), answer_type=answer_type)
        if not graded.correct:
            reasons.append(f"incorrect: extracted {graded.extracted!r}, reference {graded.reference!r}")
        if max_length is not None and len(p_ids) + len(ids) + 1 > max_length:
            reasons.append(f"too long: {len(p_ids) + len(ids) + 1} tokens > {max_length}")
        if reasons:
            failures.append({"index": i, "problem_id": row["problem_id"], "reasons": reasons})
    return failures


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
