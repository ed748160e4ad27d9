"""Stage-2 SFT: parallel SFT (NPR-Beta) and, with ``layout="sequential"``, the SR-Beta ablation.

``run_sft`` starts from the BASE model (``method.md`` §3.2, §7.18), adds the 8 tag tokens with
mean-initialised embeddings, re-tokenises the self-distilled corpus once (``distill.retokenize_trace``)
and trains with completion-only cross-entropy under the parallel layout (§1.5: siblings share start
positions and cannot see each other; the takeaway starts one past the longest sibling).

Sequential-mode formatting. Under the parallel layout the step labels ``"k:"`` after each ``<step>`` are
never targets: every sibling's ``<step>`` has the same context, so the label is not predictable there
(at inference the engine inserts it). A model trained ONLY this way has never learnt to write the labels
itself, so decoded sequentially (no engine help) it produces unnumbered steps. ``sequential_share`` is the
share of example visits trained under the ordinary causal layout instead, where every token, labels
included, is a target. The paper trains pure parallel SFT (share 0, the default here); the toy profile
uses a share > 0 because the project requires NPR-Beta to be format-valid in sequential mode as well.

Structure balance. A self-distilled corpus over-represents what the policy solves easily: on the toy
world, problems with 4-5 independent sub-problems are accepted far less often than those with 2, so
long guidelines are rare in the corpus and a model trained on it miscounts steps when it writes them
itself (sequential mode). ``plan_balance`` draws each epoch's visits with replacement, weighting an
example by ``count(its plans-per-guideline group) ** -plan_balance`` (1: every group the same total
weight). 0 (the default, the paper's behaviour) visits every example once per epoch.

Checkpoints (``workdir/checkpoints/step-XXXXXX``) hold the HF model and tokenizer (``from_pretrained``
loads them), the optimizer state (safetensors + JSON, via the strategy), and ``trainer_state.json``
(step, data cursor, config, history, corpus digest). The data order is a pure function of
(seed, epoch), so resuming from any checkpoint gives the same weights as an uninterrupted run, and a
run whose final checkpoint exists returns at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from npr_pipelines.structure import LayoutError, TagVocab, parse_text
from npr_pipelines.tokenization import (
    PromptConfig,
    add_tag_tokens,
    has_tag_tokens,
    prompt_ids,
    tag_subtoken_ids,
)
from npr_pipelines.training.batch import TrainSequence, sft_sequence, use_segment_attention
from npr_pipelines.training.checkpoint import TRAINER_STATE, list_checkpoints, read_state, step_dir_name
from npr_pipelines.training.distill import retokenize_trace
from npr_pipelines.training.overrides import apply_stage_values
from npr_pipelines.training.result import StageResult
from npr_pipelines.training.strategy import (
    OptimizerConfig,
    SftObjective,
    ShardingStrategy,
    Strategy,
    TorchStrategy,
    count_targets,
)
from npr_pipelines.training.strategy import micro_batches as make_micro_batches

CHECKPOINTS = "checkpoints"
LAYOUTS = ("parallel", "sequential")
#: Config fields a resumed run may change (they do not affect the weights).
RESUME_NEUTRAL = ("num_threads", "save_every")


@dataclass(frozen=True)
class SFTConfig:
    """Every SFT knob (also what gets logged). Defaults are the paper's (``method.md`` §3.2): lr 1e-6,
    5% warmup then cosine (the release never passes its min lr, so the cosine decays to 0), AdamW
    (0.9, 0.95), weight decay 0.1, clip 1.0, global batch 8, 1 epoch, 32k tokens, seed 521, save every
    1,000 steps, the data in corpus order (a sequential sampler), pure parallel layout.
    """

    layout: str = "parallel"
    sequential_share: float = 0.0  # parallel layout only: share of visits trained causally (see module doc)
    lr: float = 1e-6
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    batch_size: int = 8
    micro_batch_size: int | None = None  # None: the whole batch in one forward
    epochs: int = 1
    max_steps: int | None = None
    max_length: int = 32_768
    seed: int = 521
    shuffle: bool = False  # False: corpus order every epoch (the release); True: seeded permutation
    group_by_length: int = 0  # > 0: sort windows of this many batches by length, then shuffle batches
    plan_balance: float = 0.0  # 0: every example once per epoch; > 0: weighted draws (see _DataOrder)
    save_every: int = 1000  # 0: final checkpoint only
    prompt: PromptConfig = field(default_factory=PromptConfig)
    num_threads: int | None = None  # torch threads while training (None: leave as is)
    device: str = "cpu"  # "cuda" trains with FlexAttention for the parallel layout

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 0.0 <= self.sequential_share <= 1.0:
            raise ValueError("sequential_share must be within [0, 1]")
        if self.batch_size < 1 or self.epochs < 1 or self.max_length < 2:
            raise ValueError("batch_size and epochs must be >= 1, max_length >= 2")
        if not 0.0 <= self.plan_balance <= 1.0:
            raise ValueError("plan_balance must be within [0, 1]")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def with_stage_values(self, values: Any) -> SFTConfig:
        """Overrides from another config object (e.g. a toy profile entry): every field of ``values``
        whose name is a field here (same convention as ``RLConfig.with_stage_values``)."""
        return apply_stage_values(self, values)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Linear warmup over ``ceil(warmup_ratio * total)`` steps, then cosine to ``min_lr_ratio * lr``."""
        warmup = math.ceil(self.warmup_ratio * total_steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )


@dataclass(frozen=True)
class Example:
    """One corpus row as stage-2 token ids."""

    problem_id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # the re-tokenised trace + EOS
    plans: tuple[int, ...] = ()  # plans per guideline (the structure group for ``plan_balance``)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def corpus_digest(rows: Sequence[Mapping[str, Any]]) -> str:
    """What identifies a corpus for resume: problem ids, questions and texts, in order."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["problem_id"], r["question"], r["text"]]).encode())
    return h.hexdigest()


def prepare_model(
    init_dir: str | os.PathLike, seed: int = 0
) -> tuple[torch.nn.Module, Any, TagVocab, dict[str, Any]]:
    """Load the base model and add the 8 tag tokens with mean-initialised embeddings (``method.md`` §1.3).

    Returns the model, tokenizer, tag vocab and a report whose ``max_init_error`` is the largest
    deviation of a new embedding row from the mean of its tag name's sub-token rows (0 when it was done).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(init_dir))
    model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=torch.float32, trust_remote_code=False)
    if has_tag_tokens(tokenizer):
        vocab = TagVocab.from_tokenizer(tokenizer)
        return model, tokenizer, vocab, {"added": False, "vocab_size": len(tokenizer)}
    subtokens = tag_subtoken_ids(tokenizer)
    old = model.get_input_embeddings().weight.detach().clone()
    # Resizing draws the padding rows (beyond the tags) at random: seed it so a run is reproducible.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vocab = add_tag_tokens(tokenizer, model)
    new = model.get_input_embeddings().weight.detach()
    err = max(float((new[vocab.ids[t]] - old[subtokens[t.value]].mean(0)).abs().max()) for t in vocab.ids)
    report = {
        "added": True,
        "tag_ids": {t.value: i for t, i in vocab.ids.items()},
        "vocab_size": len(tokenizer),
        "embedding_rows": int(new.shape[0]),
        "max_init_error": err,
    }
    return model, tokenizer, vocab, report


def tokenize_corpus(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, vocab: TagVocab, config: SFTConfig
) -> tuple[list[Example], dict[str, int]]:
    """Prompt + re-tokenised trace + EOS per row; rows that do not fit ``max_length`` are dropped."""
    examples: list[Example] = []
    dropped = {"too_long": 0}
    eos = tokenizer.eos_token_id
    for r in rows:
        p = prompt_ids(tokenizer, r["question"], config.prompt)
        resp = [*retokenize_trace(r["text"], tokenizer, vocab), eos]
        if len(p) + len(resp) > config.max_length:
            dropped["too_long"] += 1
            continue
        plans = tuple(len(b.plans) for b in parse_text(r["text"]).blocks)
        examples.append(Example(str(r["problem_id"]), tuple(p), tuple(resp), plans))
    return examples, dropped


def _unit(*parts: Any) -> float:
    """A deterministic uniform number in [0, 1) from ``parts``."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class _DataOrder:
    """Example index and layout of every visit: a pure function of (seed, epoch, position)."""

    def __init__(self, lengths: Sequence[int], groups: Sequence[Any], config: SFTConfig) -> None:
        self.n, self.lengths, self.config = len(lengths), lengths, config
        self._epochs: dict[int, list[int]] = {}
        counts: dict[Any, int] = {}
        for g in groups:
            counts[g] = counts.get(g, 0) + 1
        # Example weight count(group)^-plan_balance: 1 leaves every group the same total weight.
        self.weights = [counts[g] ** -config.plan_balance for g in groups]

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            cfg = self.config
            order = list(range(self.n))
            rng = random.Random(f"sft-order|{cfg.seed}|{epoch}")
            if cfg.plan_balance > 0:
                order = rng.choices(range(self.n), weights=self.weights, k=self.n)
            elif cfg.shuffle:
                rng.shuffle(order)
            if cfg.group_by_length:
                # Less padding: similar lengths share a batch; batch order is shuffled again.
                window = cfg.group_by_length * cfg.batch_size
                batches: list[list[int]] = []
                for start in range(0, self.n, window):
                    chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i])
                    batches += [chunk[i : i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]
                rng.shuffle(batches)
                order = [i for b in batches for i in b]
            self._epochs[epoch] = order
        return self._epochs[epoch]

    def visit(self, cursor: int) -> tuple[int, str]:
        epoch, j = divmod(cursor, self.n)
        cfg = self.config
        sequential = (
            cfg.layout == "sequential" or _unit("sft-layout", cfg.seed, epoch, j) < cfg.sequential_share
        )
        return self.epoch_order(epoch)[j], "sequential" if sequential else "parallel"


def _save(root: Path, step: int, strategy: Strategy, tokenizer: Any, state: dict[str, Any]) -> Path:
    """Atomic checkpoint: written to a temporary sibling, then renamed to ``step-XXXXXX``."""
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    strategy.save(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def run_sft(
    init_dir: str | os.PathLike,
    corpus_rows: Sequence[Mapping[str, Any]],
    config: SFTConfig,
    workdir: str | os.PathLike,
    *,
    strategy: Strategy | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> StageResult:
    """Fine-tune the base model at ``init_dir`` on ``corpus_rows`` (resumable; see the module doc).

    ``corpus_rows`` need ``problem_id``, ``question`` and ``text`` (a valid trace). ``on_checkpoint(step,
    dir)`` runs after every checkpoint, ``on_log(record)`` after every optimizer step.
    """
    t_start = time.perf_counter()
    root = Path(workdir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    digest = corpus_digest(corpus_rows)
    cfg_dict = config.to_dict()
    existing = list_checkpoints(root)
    resume_state = None
    if existing:
        resume_state = read_state(existing[-1][1])
        same = {k: v for k, v in resume_state.config.items() if k not in RESUME_NEUTRAL} == {
            k: v for k, v in cfg_dict.items() if k not in RESUME_NEUTRAL
        }
        if not same or resume_state.extra.get("corpus_digest") != digest:
            raise ValueError(
                f"{root} holds a run with a different config or corpus; use a fresh working directory"
            )
        total = resume_state.extra["total_steps"]
        if resume_state.step >= total:
            return StageResult(
                existing[-1][1],
                resume_state.step,
                existing,
                resume_state.history,
                {**resume_state.extra.get("metrics", {}), "resumed_finished": True},
            )

    old_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(init_dir, corpus_rows, config, root, digest, resume_state, strategy, on_checkpoint,
                      on_log, t_start)  # fmt: skip
    finally:
        torch.set_num_threads(old_threads)


def _train(
    init_dir: str | os.PathLike,
    corpus_rows: Sequence[Mapping[str, Any]],
    config: SFTConfig,
    root: Path,
    digest: str,
    resume_state: Any,
    strategy: Strategy | None,
    on_checkpoint: Callable[[int, Path], None] | None,
    on_log: Callable[[dict[str, Any]], None] | None,
    t_start: float,
) -> StageResult:
    model, tokenizer, vocab, tag_report = prepare_model(init_dir, config.seed)
    model.to(config.device)
    examples, dropped = tokenize_corpus(corpus_rows, tokenizer, vocab, config)
    if not examples:
        raise ValueError("no corpus row fits max_length: nothing to train on")
    n = len(examples)
    total = max(1, n * config.epochs // config.batch_size)
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    use_segment_attention(model)
    strategy = strategy or TorchStrategy()
    strategy.setup(
        model,
        OptimizerConfig(
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            max_grad_norm=config.grad_clip,
            schedule=lambda s: config.lr_at(s, total),
        ),
    )
    step, cursor, history = 0, 0, []
    resumed_from = None
    if resume_state is not None:
        ckpt = list_checkpoints(root)[-1][1]
        strategy.load(ckpt)
        step, cursor, history = resume_state.step, resume_state.data_cursor, list(resume_state.history)
        resumed_from = step
    assert strategy.global_step == step, (strategy.global_step, step)

    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    cache: dict[tuple[int, str], TrainSequence] = {}

    def sequence(index: int, layout: str) -> TrainSequence:
        key = (index, layout)
        if key not in cache:
            ex = examples[index]
            cache[key] = sft_sequence(
                ex.prompt_ids, ex.response_ids, layout=layout, vocab=vocab, decode=decode, encode=encode
            )
        return cache[key]

    order = _DataOrder([len(e) for e in examples], [e.plans for e in examples], config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    micro = config.micro_batch_size or config.batch_size
    checkpoints = list_checkpoints(root)
    layout_errors = 0
    t_train = time.perf_counter()
    tokens_seen = 0

    def state(metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            "data_cursor": cursor,
            "config": config.to_dict(),
            "history": history,
            "extra": {
                "corpus_digest": digest,
                "total_steps": total,
                "stage": "sft",
                "strategy": strategy.state_for_checkpoint(),
                "metrics": metrics,
            },
        }

    def metrics_now() -> dict[str, Any]:
        return {
            "examples": n,
            "corpus_rows": len(corpus_rows),
            "dropped": dropped,
            "layout_errors": layout_errors,
            "total_steps": total,
            "tag_init": tag_report,
            "resumed_from": resumed_from,
            "final_loss": history[-1]["loss"] if history else None,
            "train_s": round(time.perf_counter() - t_train, 3),
            "tokens_this_run": tokens_seen,
            "wall_s": round(time.perf_counter() - t_start, 3),
            "strategy": strategy.state_for_checkpoint(),
        }

    while step < total:
        seqs: list[TrainSequence] = []
        n_seq_layout = 0
        for _ in range(config.batch_size):
            index, layout = order.visit(cursor)
            cursor += 1
            try:
                seqs.append(sequence(index, layout))
            except LayoutError:
                layout_errors += 1  # a valid trace always lays out; kept as a guard, as the release drops
                continue
            n_seq_layout += layout == "sequential"
        denominator = float(max(1, count_targets(seqs)))
        if isinstance(strategy, ShardingStrategy):  # ranks elsewhere: each collates its share
            out = strategy.train_sequences(SftObjective(denominator), seqs, micro, pad_id)
            padded = int(out.get("padded_tokens", 0))
        else:
            batches = make_micro_batches(seqs, micro, pad_id)
            out = strategy.train_step(SftObjective(denominator), batches)
            padded = sum(int(b.input_ids.numel()) for b in batches)
        step += 1
        tokens_seen += sum(len(s) for s in seqs)
        record = {
            "step": step,
            "loss": out["loss"],
            "grad_norm": out["grad_norm"],
            "lr": out["lr"],
            "sequences": len(seqs),
            "sequential_sequences": n_seq_layout,
            "targets": int(denominator),
            "tokens": sum(len(s) for s in seqs),
            "padded_tokens": padded,
            "elapsed_s": round(time.perf_counter() - t_train, 3),
        }
        history.append(record)
        if on_log is not None:
            on_log(record)
        if step == total or (config.save_every and step % config.save_every == 0):
            path = _save(root, step, strategy, tokenizer, state(metrics_now()))
            checkpoints = list_checkpoints(root)
            if on_checkpoint is not None:
                on_checkpoint(step, path)
    final = list_checkpoints(root)[-1]
    return StageResult(final[1], final[0], checkpoints, history, metrics_now())
