"""SFT mechanics on a tiny model: the tag tokens are added with mean-initialised embeddings on the main
path, checkpoints load with ``from_pretrained``, resume gives the same weights, a finished run returns at
once, and the sequential share / sequential layout reach the batches."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from _support import byte_bpe_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from npr_pipelines.engine.testing import tiny_qwen3
from npr_pipelines.structure import Trace, render
from npr_pipelines.tokenization import PromptConfig, has_tag_tokens, tag_subtoken_ids
from npr_pipelines.training.checkpoint import read_state, weights_digest
from npr_pipelines.training.sft import SFTConfig, prepare_model, run_sft

PROMPT = PromptConfig(instruction="Answer in the parallel format.", separator="\n")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny 'base model' whose tokenizer does not have the tags yet (as the toy base model)."""
    tok = byte_bpe_tokenizer(with_tags=False)
    model = tiny_qwen3(len(tok), seed=3)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def corpus(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i + 2, 2 * i + 3
        text = render(Trace.build([([f"{a}*2", f"{b}*2"], [f"{a}*2={2 * a}", f"{b}*2={2 * b}"], "add the products")],
                                  f"{2 * a}+{2 * b}={2 * (a + b)}\n\\boxed{{{2 * (a + b)}}}"))  # fmt: skip
        rows.append(
            {
                "problem_id": f"p{i}",
                "question": f"Compute {a}*2+{b}*2.",
                "answer": str(2 * (a + b)),
                "text": text,
            }
        )
    return rows


CFG = SFTConfig(lr=1e-3, batch_size=2, epochs=2, max_steps=4, save_every=2, warmup_ratio=0.25, max_length=512,
                shuffle=True, seed=1, prompt=PROMPT)  # fmt: skip


def test_tag_tokens_are_added_with_mean_initialised_embeddings(base_dir) -> None:
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    sub = tag_subtoken_ids(base_tok)
    old = AutoModelForCausalLM.from_pretrained(base_dir).get_input_embeddings().weight.detach()
    model, tok, vocab, report = prepare_model(base_dir)
    emb = model.get_input_embeddings().weight.detach()
    assert report["added"] and report["max_init_error"] == 0.0 and has_tag_tokens(tok)
    assert emb.shape[0] % 64 == 0 and emb.shape[0] >= len(tok) == len(base_tok) + 8
    for tag, tid in vocab.ids.items():
        assert tid >= len(base_tok)
        torch.testing.assert_close(emb[tid], old[sub[tag.value]].mean(0))
    torch.testing.assert_close(emb[: len(base_tok)], old[: len(base_tok)])


def test_run_sft_checkpoints_load_and_resume_gives_the_same_weights(base_dir, tmp_path) -> None:
    logs: list[dict] = []
    full = run_sft(base_dir, corpus(), CFG, tmp_path / "full", on_log=logs.append)
    assert full.final_step == 4 and [s for s, _ in full.checkpoints] == [2, 4]
    assert [h["step"] for h in full.history] == [1, 2, 3, 4] == [h["step"] for h in logs]
    assert all(math.isfinite(h["loss"]) and h["sequences"] == 2 for h in full.history)
    assert (
        full.history[-1]["lr"] < full.history[1]["lr"] and full.metrics["tag_init"]["max_init_error"] == 0.0
    )
    for _, path in full.checkpoints:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert has_tag_tokens(tok) and model.config._attn_implementation != "npr_segments"
        assert read_state(path).config == CFG.to_dict()
    digest = weights_digest(AutoModelForCausalLM.from_pretrained(full.final_dir))

    class Crash(RuntimeError):
        pass

    def crash(step: int, path: Path) -> None:
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        run_sft(base_dir, corpus(), CFG, tmp_path / "resumed", on_checkpoint=crash)
    resumed = run_sft(base_dir, corpus(), CFG, tmp_path / "resumed")
    assert resumed.metrics["resumed_from"] == 2 and resumed.final_step == 4
    assert weights_digest(AutoModelForCausalLM.from_pretrained(resumed.final_dir)) == digest
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]

    logs.clear()
    again = run_sft(base_dir, corpus(), CFG, tmp_path / "full", on_log=logs.append)
    assert logs == [] and again.final_dir == full.final_dir and again.metrics["resumed_finished"]
    with pytest.raises(ValueError, match="different config or corpus"):
        run_sft(base_dir, corpus(5), CFG, tmp_path / "full")


def test_sequential_share_and_sequential_layout_reach_the_batches(base_dir, tmp_path) -> None:
    from dataclasses import replace

    rows = corpus()
    par = run_sft(base_dir, rows, replace(CFG, save_every=0), tmp_path / "par")
    assert sum(h["sequential_sequences"] for h in par.history) == 0
    mixed = run_sft(
        base_dir, rows, replace(CFG, save_every=0, sequential_share=0.5, max_steps=6), tmp_path / "mix"
    )
    n_seq = sum(h["sequential_sequences"] for h in mixed.history)
    assert 0 < n_seq < 12
    seq = run_sft(base_dir, rows, replace(CFG, save_every=0, layout="sequential"), tmp_path / "seq")
    assert all(h["sequential_sequences"] == h["sequences"] for h in seq.history)
    # the causal layout trains the step labels the parallel layout leaves out: more targets per step
    assert sum(h["targets"] for h in seq.history) > sum(h["targets"] for h in par.history)
    with pytest.raises(ValueError, match="layout"):
        SFTConfig(layout="tree")


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = SFTConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] > 0.1
    assert cfg.lr_at(100, 100) == pytest.approx(0.1)


def test_group_by_length_packs_similar_lengths_and_stage_values_apply(base_dir, tmp_path) -> None:
    from dataclasses import dataclass, replace

    rows = corpus(4) + [
        {**r, "problem_id": r["problem_id"] + "x", "question": r["question"] + " Show all work carefully."}
        for r in corpus(4)
    ]
    cfg = replace(CFG, save_every=0, max_steps=8, epochs=4, batch_size=4)
    plain = run_sft(base_dir, rows, cfg, tmp_path / "plain")
    grouped = run_sft(base_dir, rows, replace(cfg, group_by_length=2), tmp_path / "grouped")
    pad = lambda r: sum(h["padded_tokens"] - h["tokens"] for h in r.history)  # noqa: E731
    assert pad(grouped) < pad(plain)
    assert sum(h["tokens"] for h in grouped.history) == sum(h["tokens"] for h in plain.history)

    @dataclass(frozen=True)
    class Entry:  # shaped like a toy profile entry
        lr: float = 5e-3
        betas: tuple[float, float] = (0.9, 0.98)
        n_problems: int = 3  # not an SFT field: ignored

    applied = SFTConfig().with_stage_values(Entry())
    assert (applied.lr, applied.betas, applied.batch_size) == (5e-3, (0.9, 0.98), 8)


def test_plan_balance_evens_out_structure_groups() -> None:
    from npr_pipelines.training.sft import _DataOrder

    groups = [(2,)] * 90 + [(5,)] * 10
    lengths = [10] * 100
    natural = _DataOrder(lengths, groups, SFTConfig(shuffle=True, seed=3))
    assert sorted(natural.epoch_order(0)) == list(range(100))  # a permutation: each example once
    share = lambda order: sum(groups[i] == (5,) for i in order) / len(order)  # noqa: E731
    balanced = _DataOrder(lengths, groups, SFTConfig(plan_balance=1.0, seed=3))
    visits = [i for e in range(20) for i in balanced.epoch_order(e)]
    assert 0.4 < share(visits) < 0.6  # equal total weight per group
    half = _DataOrder(lengths, groups, SFTConfig(plan_balance=0.5, seed=3))
    assert 0.15 < share([i for e in range(20) for i in half.epoch_order(e)]) < 0.4
    assert balanced.epoch_order(4) == _DataOrder(
        lengths, groups, SFTConfig(plan_balance=1.0, seed=3)
    ).epoch_order(4)
