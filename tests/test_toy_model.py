"""The tiny Qwen3 base model: size, save/load, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from npr_pipelines.tokenization import prompt_text
from npr_pipelines.toy.model import ModelConfig, build_model, count_parameters, load_model, save_model
from npr_pipelines.toy.tokenizer import TOY_PROMPT, TokenizerConfig, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(vocab_size=384, corpus_problems=300))


def test_default_model_is_about_a_million_parameters(tok):
    model = build_model(ModelConfig(), tok)
    assert isinstance(model, Qwen3ForCausalLM)
    assert 0.9e6 < count_parameters(model) < 1.1e6
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        128,
        4,
        4,
        2,
    )
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (32, 512, len(tok))
    assert cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id


def test_init_is_deterministic(tok):
    a, b = build_model(ModelConfig(), tok, seed=3), build_model(ModelConfig(), tok, seed=3)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_save_load_gives_identical_logits(tok, tmp_path):
    model = build_model(ModelConfig(hidden_size=64, intermediate_size=128, head_dim=16), tok).eval()
    path = save_model(model, tok, tmp_path / "m")
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin"))  # safetensors only
    loaded = load_model(path)
    ids = torch.randint(0, len(tok), (3, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert AutoTokenizer.from_pretrained(path).encode("12+3") == tok.encode("12+3")


def test_generate_with_cache_stops_at_eos(tok):
    model = build_model(
        ModelConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, head_dim=16), tok
    )
    enc = tok(prompt_text(tok, "Compute 2*3+4*5.", TOY_PROMPT), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=True)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 8
