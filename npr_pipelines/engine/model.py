"""A Qwen3 forward over a paged KV pool, using the weights (and norms, MLPs, rotary embedding) of a
Hugging Face ``Qwen3ForCausalLM``.

One call runs every query token of a step, whatever stream it belongs to: prompt prefills, inserted
headers, the KV-only ``</guideline>``/``</step>`` of a fork or join, and one sampled token per live
stream. Per layer, all new K/V are written to their slots first, then each row attends over the slots
of its stream's table, so a row may read KV written in the same step by another row (a branch header
reads its fork's ``</guideline>``; a ``<takeaway>`` reads every branch's ``</step>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb


@dataclass(frozen=True)
class Row:
    """One stream's queries in a step: the last ``len(tokens)`` entries of ``kv_slots``."""

    kv_slots: torch.Tensor  # [L] int64: the stream's whole KV view, the queries' own slots last
    tokens: Sequence[int]
    positions: Sequence[int]
    sample: bool  # whether the last query's logits are needed


@dataclass(frozen=True)
class _Group:
    """Rows attended together: queries padded to ``[R, Q]``, keys to ``[R, K]``."""

    q_index: torch.Tensor  # [R, Q] int64 into the step's flat tokens (0 where padded)
    q_valid: torch.Tensor  # [R, Q] bool
    kv_slots: torch.Tensor  # [R, K] int64 (0 where padded)
    mask: torch.Tensor  # [R, 1, Q, K] additive float: 0 allowed, dtype min blocked


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T]
    groups: tuple[_Group, ...]
    sample_index: torch.Tensor  # [S] indices into T whose logits are returned


class PagedQwen3:
    """Owns the KV tensors ``[num_blocks, block_size, n_kv_heads, head_dim]`` per layer."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, small_query_max: int = 32):
        cfg = model.config
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
            raise NotImplementedError("sliding-window Qwen3 layers are not supported by the paged forward")
        # No .eval(): the caller's module (maybe shared with a trainer) keeps its mode; this forward
        # has no dropout path, and it reads the live weights on every call (no copies).
        self.hf = model
        self.config = cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.small_query_max = small_query_max
        self.num_slots = num_blocks * block_size
        shape = (num_blocks, block_size, self.n_kv, self.head_dim)
        layers = cfg.num_hidden_layers
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_output_embeddings().weight.shape[0]

    def kv_bytes_per_token(self) -> int:
        return 2 * self.config.num_hidden_layers * self.n_kv * self.head_dim * self.k_cache[0].element_size()

    # ----------------------------------------------------------------- batch building
    def build(self, rows: Sequence[Row]) -> Batch:
        dev = self.device
        ids, pos, slots, sample = [], [], [], []
        offsets = []
        for r in rows:
            n = len(r.tokens)
            assert 0 < n <= len(r.kv_slots)
            offsets.append(len(ids))
            ids.extend(r.tokens)
            pos.extend(r.positions)
            if r.sample:
                sample.append(len(ids) - 1)
        slot_parts = [r.kv_slots[-len(r.tokens) :] for r in rows]
        small = [i for i, r in enumerate(rows) if len(r.tokens) <= self.small_query_max]
        large = [[i] for i, r in enumerate(rows) if len(r.tokens) > self.small_query_max]
        groups = [
            self._group([rows[i] for i in g], [offsets[i] for i in g])
            for g in ([small] if small else []) + large
        ]
        slots = torch.cat(slot_parts).to(dev)
        return Batch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            write_slots=slots,
            groups=tuple(groups),
            sample_index=torch.tensor(sample, dtype=torch.long, device=dev),
        )

    def _group(self, rows: Sequence[Row], offsets: Sequence[int]) -> _Group:
        dev = self.device
        n_q = torch.tensor([len(r.tokens) for r in rows], device=dev)
        n_kv = torch.tensor([len(r.kv_slots) for r in rows], device=dev)
        q_max = int(n_q.max())
        j = torch.arange(q_max, device=dev)
        q_valid = j[None, :] < n_q[:, None]
        q_index = torch.where(q_valid, torch.tensor(offsets, device=dev)[:, None] + j[None, :], 0)
        kv_slots = torch.nn.utils.rnn.pad_sequence([r.kv_slots.to(dev) for r in rows], batch_first=True)
        # Query j of a row sees its stream's first (n_kv - n_q + j + 1) slots; padded queries see slot 0
        # only (their output is discarded; this just avoids an all-blocked softmax).
        visible = torch.where(q_valid, n_kv[:, None] - n_q[:, None] + j[None, :] + 1, 1)
        allowed = torch.arange(kv_slots.shape[1], device=dev)[None, None, :] < visible[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return _Group(q_index, q_valid, kv_slots, mask[:, None])

    # ----------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits ``[S, V]`` (float32) at ``batch.sample_index``; writes every query's K/V to its slot."""
        inner = self.hf.model
        t = batch.input_ids.shape[0]
        h = inner.embed_tokens(batch.input_ids)  # [T, hidden]
        cos, sin = inner.rotary_emb(h[None], batch.positions[None])  # [1, T, head_dim] each
        cos, sin = cos[0], sin[0]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_norm(attn.q_proj(x).view(t, self.n_heads, self.head_dim))
            k = attn.k_norm(attn.k_proj(x).view(t, self.n_kv, self.head_dim))
            v = attn.v_proj(x).view(t, self.n_kv, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            k_flat = self.k_cache[i].view(self.num_slots, self.n_kv, self.head_dim)
            v_flat = self.v_cache[i].view(self.num_slots, self.n_kv, self.head_dim)
            k_flat[batch.write_slots] = k
            v_flat[batch.write_slots] = v
            out = torch.empty_like(q)
            for g in batch.groups:
                qg = q[g.q_index].transpose(1, 2)  # [R, H, Q, D]
                kg = k_flat[g.kv_slots].transpose(1, 2)  # [R, Hkv, K, D]
                vg = v_flat[g.kv_slots].transpose(1, 2)
                og = F.scaled_dot_product_attention(
                    qg, kg, vg, attn_mask=g.mask, scale=self.scaling, enable_gqa=True
                )
                og = og.transpose(1, 2)  # [R, Q, H, D]
                out[g.q_index[g.q_valid]] = og[g.q_valid]
            h = h + attn.o_proj(out.reshape(t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = inner.norm(h[batch.sample_index])
        return self.hf.lm_head(h).float()
