"""The tiny base model: a ``transformers`` ``Qwen3ForCausalLM`` of about a million parameters.

Same architecture as the real models (RMSNorm, GQA, QK-norm, RoPE, SwiGLU, tied embeddings), so every
code path (tag-token addition, parallel masks and positions, caches) runs unchanged on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the toy model (defaults: ``spec/toy-notes.md``, ~1M parameters)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"


def qwen3_config(config: ModelConfig, tokenizer) -> Qwen3Config:
    """The ``Qwen3Config`` for ``config`` with ``tokenizer``'s vocabulary and special ids."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def build_model(config: ModelConfig, tokenizer, seed: int = 0) -> Qwen3ForCausalLM:
    """A freshly initialised toy model (deterministic for a given ``seed``)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(config, tokenizer))
    model.config._attn_implementation = config.attn_implementation
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_model(model: torch.nn.Module, tokenizer, path: str | Path) -> Path:
    """``save_pretrained`` the model (safetensors) and the tokenizer into ``path``."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    """Load a saved toy model (safetensors; no remote code) in eval mode."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False).eval()
