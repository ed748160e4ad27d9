"""Bootstrap the toy base model: a tiny Qwen3 trained on the CPU in a few minutes to behave like an
instruct model that meets the NPR prompt for the first time.

The training mixture (every example uses the toy NPR prompt, loss on the completion only):

- mostly sequential chain-of-thought solutions;
- a minority in the parallel format, enough that the format is really learnt -- so a few percent of
  its samples at T=1 are format-valid, which is what NPR-Zero's format-gated reward needs to start from;
- some of those parallel solutions corrupted, so that they fail the strict validator;
- a noisy teacher: a share of the solutions carry one wrong intermediate result through to the answer.
  The model then samples those errors at T=1 while its mode (greedy) stays right: headroom for RL.

Training is deterministic for a given config (fixed step budget, seeded data order and init, fixed
thread count) and cached by a hash of the config under ``<cache root>/toy_base/<hash>``: a rerun with
the same config returns the cached directory without training.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers

from npr_pipelines.tokenization import PromptConfig, prompt_text
from npr_pipelines.toy.cache import build_cached, cache_root, config_hash, to_json
from npr_pipelines.toy.model import ModelConfig, build_model, count_parameters, save_model
from npr_pipelines.toy.problems import TRAIN, ProblemConfig, ProblemStream, ToyProblem
from npr_pipelines.toy.solutions import (
    CORRUPTIONS,
    corrupt,
    parallel_solution,
    sample_noise,
    sequential_solution,
)
from npr_pipelines.toy.tokenizer import IM_END, TOY_PROMPT, TokenizerConfig, build_tokenizer

#: Bump when the bootstrap code changes in a way that changes its output (invalidates the cache).
BOOTSTRAP_VERSION = "1"
#: Written last into a bootstrapped directory; its presence marks the directory complete.
MANIFEST = "bootstrap.json"


@dataclass(frozen=True)
class MixtureConfig:
    """What the bootstrap data looks like (shares are per example, drawn independently)."""

    parallel_share: float = 0.2  # examples in the parallel format
    corrupt_share: float = 0.3  # of the parallel examples, damaged so they fail the validator
    corruptions: tuple[str, ...] = CORRUPTIONS
    noise_rate: float = 0.2  # examples whose teacher makes one intermediate mistake
    noise_max_delta: int = 10
    prompt: PromptConfig = TOY_PROMPT


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``, fixed step budget."""

    # Batches of 32 rather than 64: more updates per example, and the tiny model is update-bound here
    # (held-out T=1 accuracy, seeds 0/1/2: 0.30 / 0.31 / 0.22 after 512 x 32, against 0.28 / 0.23 / 0.17
    # after 320 x 64, in about the same time: 126-148 s on 2 idle cores). Micro-batches of 8 waste less
    # on padding than 16 (a step's examples are sorted by length, long parallel traces come together).
    steps: int = 512
    batch_size: int = 32  # examples per optimiser step (a random sample of the mixture)
    micro_batch_size: int = 8  # examples per forward pass; a step's examples are sorted by length first
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 20


@dataclass(frozen=True)
class BootstrapConfig:
    """Everything that determines the bootstrapped base model (``cache_dir`` does not enter the hash)."""

    seed: int = 0
    num_threads: int = 2
    problems: ProblemConfig = field(default_factory=ProblemConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: str | None = None  # None: ``NPR_CACHE_DIR`` or ``.npr/cache``

    def with_seed(self, seed: int) -> BootstrapConfig:
        return replace(self, seed=seed)

    @property
    def key(self) -> str:
        return config_hash(self, BOOTSTRAP_VERSION, exclude=("cache_dir",))

    def path(self) -> Path:
        """Where the bootstrapped model lives (whether or not it exists yet)."""
        return cache_root(self.cache_dir) / "toy_base" / self.key


@dataclass(frozen=True)
class Example:
    """One training example: token ids of prompt and completion (completion ends with eos)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    kind: str  # "sequential" | "parallel" | "corrupt:<kind>", with "+noise" when the teacher erred

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def solution_for(problem: ToyProblem, mixture: MixtureConfig, rng: random.Random) -> tuple[str, str]:
    """Draw one completion of the mixture for ``problem``: ``(text, kind)``."""
    noise = sample_noise(problem, rng, mixture.noise_max_delta) if rng.random() < mixture.noise_rate else None
    suffix = "+noise" if noise is not None else ""
    if rng.random() >= mixture.parallel_share:
        return sequential_solution(problem, noise), "sequential" + suffix
    text = parallel_solution(problem, noise)
    if mixture.corruptions and rng.random() < mixture.corrupt_share:
        kind = rng.choice(mixture.corruptions)
        return corrupt(text, kind), f"corrupt:{kind}" + suffix
    return text, "parallel" + suffix


def build_examples(config: BootstrapConfig, tokenizer, n: int) -> list[Example]:
    """``n`` training examples from distinct train-split problems (deterministic for the config)."""
    rng = random.Random(f"toy-bootstrap-mixture|{config.seed}")
    stream = iter(ProblemStream(TRAIN, config.seed, config.problems))
    problems = [next(stream) for _ in range(n)]
    drawn = [solution_for(p, config.mixture, rng) for p in problems]
    prompts = [prompt_text(tokenizer, p.question, config.mixture.prompt) for p in problems]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer([text + IM_END for text, _ in drawn], add_special_tokens=False)["input_ids"]
    return [Example(list(p), list(c), kind) for p, c, (_, kind) in zip(p_ids, c_ids, drawn, strict=True)]


def micro_batches(batch: list[Example], micro_batch_size: int) -> list[list[Example]]:
    """Split one optimiser batch into micro-batches of similar length (little padding).

    Sorting happens inside the step only, so every step still sees a random mix of the whole mixture
    (sorting across steps would give length-homogeneous steps -- all long parallel traces, then all
    short sequential ones -- which slows learning badly).
    """
    ordered = sorted(batch, key=len)
    return [ordered[i : i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and next-token ``targets`` (-100 on prompt, padding and the last slot).

    No attention mask is needed: with right padding a causal model never attends to the pads from a
    real token, and pads carry no loss.
    """
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        seq = e.prompt_ids + e.completion_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        # position i predicts token i+1: completion tokens are predicted from position len(prompt)-1 on
        targets[row, len(e.prompt_ids) - 1 : len(seq) - 1] = torch.tensor(e.completion_ids)
    return ids, targets


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    )


def train_base_model(
    config: BootstrapConfig,
    out_dir: Path,
    callback: Callable[[int, torch.nn.Module, object], None] | None = None,
) -> dict:
    """Build tokenizer and model, train on the mixture, save both into ``out_dir``; return statistics.

    ``callback(step, model, tokenizer)``, if given, runs after every optimiser step (for experiments;
    its time counts in ``train_seconds``).
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        tokenizer = build_tokenizer(config.tokenizer, config.problems)
        cfg = config.train
        examples = build_examples(config, tokenizer, cfg.steps * cfg.batch_size)
        rng = random.Random(f"toy-bootstrap-order|{config.seed}")
        rng.shuffle(examples)
        batches = [examples[i : i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
        longest = max(len(e) for e in examples)
        if longest > config.model.max_position_embeddings:
            raise ValueError(f"an example has {longest} tokens > max_position_embeddings")
        model = build_model(config.model, tokenizer, seed=config.seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        t_data = time.perf_counter() - t0
        losses: list[tuple[int, float]] = []
        tokens = real_tokens = 0
        running = 0.0
        for step, batch in enumerate(batches[: cfg.steps]):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            n_targets = sum(len(e.completion_ids) for e in batch)
            step_loss = 0.0
            for micro in micro_batches(batch, cfg.micro_batch_size):
                ids, targets = collate(micro, tokenizer.pad_token_id)
                logits = model(input_ids=ids).logits
                # token-mean over the whole step: every completion token weighs the same
                loss = (
                    torch.nn.functional.cross_entropy(
                        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
                    )
                    / n_targets
                )
                loss.backward()
                step_loss += loss.item()
                tokens += ids.numel()
                real_tokens += sum(len(e) for e in micro)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            running += step_loss
            if callback is not None:
                callback(step + 1, model, tokenizer)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                n = (step % cfg.log_every) + 1
                losses.append((step + 1, round(running / n, 5)))
                running = 0.0
        t_train = time.perf_counter() - t0 - t_data
        model.eval()
        save_model(model, tokenizer, out_dir)
        kinds: dict[str, int] = {}
        for e in examples:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        return {
            "parameters": count_parameters(model),
            "vocab_size": len(tokenizer),
            "examples": len(examples),
            "example_kinds": dict(sorted(kinds.items())),
            "tokens_padded": tokens,
            "tokens_real": real_tokens,
            "padding_waste": round(1 - real_tokens / max(1, tokens), 4),
            "max_example_tokens": longest,
            "losses": losses,
            "final_loss": losses[-1][1] if losses else None,
            "data_seconds": round(t_data, 2),
            "train_seconds": round(t_train, 2),
            "wall_seconds": round(time.perf_counter() - t0, 2),
            # CPU time of this process (all threads): on a busy shared machine, cpu_seconds / num_threads
            # approximates the wall time the bootstrap would take on idle cores
            "cpu_seconds": round(time.process_time() - cpu0, 2),
            "num_threads": config.num_threads,
        }
    finally:
        torch.set_num_threads(old_threads)


def bootstrap_base_model(config: BootstrapConfig | None = None) -> Path:
    """The directory of the bootstrapped base model (model + tokenizer, ``save_pretrained`` layout).

    Trains it on the first call for a config (written atomically), returns the cached copy afterwards.
    The directory's ``bootstrap.json`` holds the config, its hash and the training statistics.
    """
    config = config or BootstrapConfig()

    def build(tmp: Path) -> None:
        stats = train_base_model(config, tmp)
        manifest = {
            "key": config.key,
            "version": BOOTSTRAP_VERSION,
            "config": to_json(config),
            "stats": stats,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    path, _ = build_cached(config.path(), MANIFEST, build)
    return path


def bootstrap_manifest(path: str | Path) -> dict:
    """The ``bootstrap.json`` of a bootstrapped directory."""
    return json.loads((Path(path) / MANIFEST).read_text())
