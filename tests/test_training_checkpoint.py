"""Checkpoints: from_pretrained-loadable, optimizer restored without pickles, atomic, listed in order."""

from __future__ import annotations

import torch
from _support import byte_bpe_tokenizer
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from npr_pipelines.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    read_state,
    save_checkpoint,
    weights_digest,
)


def _model(vocab: int) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(
        Qwen3Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    )  # fmt: skip


def _train_step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (2, 8), generator=g)
    loss = model(x, labels=x).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_resume_from_checkpoint_gives_identical_weights(tmp_path) -> None:
    tok = byte_bpe_tokenizer()
    # Uninterrupted: 4 steps.
    model = _model(len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(4):
        _train_step(model, opt, s)
    reference = weights_digest(model)

    # Interrupted after 2 steps, checkpointed, restored into fresh objects.
    model = _model(len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(2):
        _train_step(model, opt, s)
    path = save_checkpoint(
        tmp_path, 2, model, tok, opt, data_cursor=16, config={"lr": 1e-2}, history=[{"loss": 1.0}]
    )
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # nothing pickled

    restored = AutoModelForCausalLM.from_pretrained(path)
    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    load_optimizer_state(path, opt2)
    state = read_state(path)
    assert (state.step, state.data_cursor, state.config, state.history) == (
        2,
        16,
        {"lr": 1e-2},
        [{"loss": 1.0}],
    )
    for s in range(state.step, 4):
        _train_step(restored, opt2, s)
    assert weights_digest(restored) == reference


def test_listing_ignores_incomplete_directories(tmp_path) -> None:
    tok = byte_bpe_tokenizer()
    model = _model(len(tok))
    for step in (5, 10):
        save_checkpoint(tmp_path, step, model, None, None, data_cursor=step, config={})
    (tmp_path / "step-000020").mkdir()  # a crash before the trainer state was written
    (tmp_path / ".tmp-step-000030-1").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10]
    assert latest_checkpoint(tmp_path).name == "step-000010"
    assert latest_checkpoint(tmp_path / "missing") is None
