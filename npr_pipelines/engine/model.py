"""A Qwen3 forward over a paged KV pool and per-request KV views, using the weights (and rotary
embedding) of a Hugging Face ``Qwen3ForCausalLM``.

One call runs every query token of a step, whatever stream it belongs to: prompt prefills, inserted
headers, the KV-only ``</guideline>``/``</step>`` of a fork or join, and one sampled token per live
stream.

Storage.

* The paged pool (``[slots, 2 * n_kv_heads, head_dim]`` per layer: K heads then V heads, addressed by the engine's refcounted
  ``KVTable`` slots) is the KV store the engine's memory accounting manages: forks share prefix
  blocks, joins concatenate slot lists, nothing is ever copied there.
* Attention reads a *view* instead, because gathering every row's scattered slots into a dense
  ``[R, H, K, D]`` tensor on every step and layer costs as much as the attention itself. Each running
  request owns one lane of a dense per-layer tensor ``[lanes, 2 * n_kv_heads, capacity, head_dim]``, and
  every token the request runs through the model is appended to it, whatever stream it belongs to:
  the lane holds the request's KV once, in the order the tokens were computed (siblings interleave).
  A fork or a join therefore copies nothing here either. Which keys a query may read is a mask: a
  trunk query (prompt, guideline, takeaway, answer) sees every earlier key of its lane; a branch query
  sees the keys written before its block forked (``shared_end``) and its own branch's keys (the lane's
  ``owner`` array records, per key, the branch stream that wrote it). That is exactly the layout rule:
  a step sees the prefix and itself, the takeaway and everything after it see all branches.
* Lanes ``[0, n)`` are the running requests, kept compact (a finished request's lane is refilled by
  the last one), so attention runs over the slice ``lanes[:n, :, :K]`` without copying. Queries of
  one KV group are stacked (``[n, n_kv, group * Q, D]``), which is the fastest grouped-query attention
  on the CPU. A lane with more than ``small_query_max`` queries in a step (a prompt prefill, a fork's
  headers) attends in a call of its own, so one wide lane does not pad every other lane's queries.

The views cost memory equal to the pool's (each running request's KV once); ``check_views`` verifies
that they hold what the pool holds.

Weights are read live from the module; derived copies (q/k/v and gate/up concatenated, all projection
weights transposed, which makes CPU GEMMs of a few rows about twice as fast) are rebuilt whenever a
weight is modified in place or replaced, and only made for models up to ``PACK_MAX_BYTES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from npr_pipelines.engine.kv_cache import KVTable

#: Keep transposed/concatenated copies of the projection weights for models up to this size.
PACK_MAX_BYTES = 1 << 30
#: Up to this many branch queries of one request attend as separate batch entries (see "expand").
_EXPAND_MAX = 3


class Row(NamedTuple):
    """One stream's queries in a step: the last ``len(tokens)`` slots of ``table``.

    Rows of one request must be passed consecutively, in the request's stream order (a trunk segment
    before the branches it forks, the branches before the continuation that joins them).
    """

    lane: int  # the request's identity (its view)
    stream: int  # the stream's identity (owner of its keys in the view)
    branch: bool  # a branch stream: sees only the fork's prefix and its own keys
    table: KVTable  # the stream's whole context, this step's tokens last
    tokens: Sequence[int]
    positions: Sequence[int]
    sample: bool  # whether the last query's logits are needed


@dataclass(frozen=True)
class _Packed:
    key: tuple  # (data_ptr, version) of the weights they were built from
    qk_norm: torch.Tensor  # [n_heads + n_kv, D]: q_norm's weight per query head, then k_norm's per KV head
    qkv_t: torch.Tensor | None  # [hidden, (n_heads + 2 n_kv) D]
    o_t: torch.Tensor | None  # [n_heads D, hidden]
    gate_up_t: torch.Tensor | None  # [hidden, 2 intermediate]
    down_t: torch.Tensor | None  # [intermediate, hidden]


@dataclass
class _Lane:
    index: int
    length: int = 0  # keys held
    shared_end: int = 0  # keys written by trunk streams so far: what the current block's branches see
    slots: list[int] = field(default_factory=list)  # the pool slot of every key (``check_views``)


class PagedQwen3:
    """The forward, the pool tensors and the per-request views."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        small_query_max: int = 8,
        *,
        pack_weights: bool | None = None,
        initial_view_capacity: int = 256,
    ):
        cfg = model.config
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
            raise NotImplementedError("sliding-window Qwen3 layers are not supported by the paged forward")
        # No .eval(): the caller's module (maybe shared with a trainer) keeps its mode; this forward
        # has no dropout path.
        self.hf = model
        self.config = cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.small_query_max = small_query_max
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.n_layers = cfg.num_hidden_layers
        # K heads then V heads per slot: one write per layer and step
        shape = (self.num_slots, 2 * self.n_kv, self.head_dim)
        self.kv_pool = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)
        ]
        if pack_weights is None:
            pack_weights = sum(p.numel() * p.element_size() for p in model.parameters()) <= PACK_MAX_BYTES
        self.pack = pack_weights
        self.fuse = pack_weights and self._fusable()
        layers = model.model.layers
        self._qk_eps = layers[0].self_attn.q_norm.variance_epsilon
        if any(
            lyr.self_attn.q_norm.variance_epsilon != self._qk_eps
            or lyr.self_attn.k_norm.variance_epsilon != self._qk_eps
            for lyr in layers
        ):
            raise NotImplementedError("q_norm and k_norm must share one epsilon")
        self._packed: list[_Packed | None] = [None] * self.n_layers
        self._slots = self._weight_slots()
        self._lm: tuple[tuple, torch.Tensor] | None = None
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        self._rope_cacheable = rope_type in ("default", "linear")
        self._initial_cap = initial_view_capacity
        self._lanes: dict[int, _Lane] = {}
        self._lane_keys: list[int] = []  # lane index -> request key
        self.kv_view: list[torch.Tensor] = []  # [lanes, 2 n_kv, cap, D]: K heads, then V heads
        self.owner = torch.empty(0)
        self._arange = torch.arange(1024, device=self.device)
        self._heads: tuple[int, torch.Tensor] | None = None
        self._alloc_views(8, initial_view_capacity)
        self.peak_view_tokens = 0

    # ----------------------------------------------------------------- weights
    def _fusable(self) -> bool:
        if getattr(self.config, "hidden_act", "") != "silu":
            return False
        for layer in self.hf.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)
            if any(
                type(lin) is not torch.nn.Linear or lin.bias is not None for lin in (*linears, mlp.down_proj)
            ):
                return False
        return True

    def _weight_slots(self) -> list[list[dict]]:
        """Per layer, the ``_parameters`` dicts holding the weights the packed copies derive from.

        Reading ``d["weight"]`` follows a replaced parameter and costs a dict lookup; going through
        ``module.weight`` (``nn.Module.__getattr__``) on every step would cost more than the packing saves.
        """
        slots = []
        for layer in self.hf.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            mods = [attn.q_norm, attn.k_norm]
            if self.fuse:
                mods += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj]
                mods += [mlp.down_proj]
            slots.append([m._parameters for m in mods])
        return slots

    def _layer_weights(self) -> list[_Packed]:
        """Derived per-layer weights, rebuilt for a layer whose weights were modified in place (an
        optimizer step, ``load_state_dict``: the version changes) or replaced (the pointer changes)."""
        out = []
        for i, dicts in enumerate(self._slots):
            ws = [d["weight"] for d in dicts]
            key = tuple((w.data_ptr(), w._version) for w in ws)
            prev = self._packed[i]
            if prev is None or prev.key != key:
                prev = self._packed[i] = self._pack(ws, key)
            out.append(prev)
        return out

    def _pack(self, ws: list[torch.Tensor], key: tuple) -> _Packed:
        with torch.no_grad():
            qk_norm = torch.cat([ws[0].expand(self.n_heads, -1), ws[1].expand(self.n_kv, -1)]).contiguous()
            if not self.fuse:
                return _Packed(key, qk_norm, None, None, None, None)
            return _Packed(
                key,
                qk_norm,
                torch.cat(ws[2:5]).t().contiguous(),
                ws[5].t().contiguous(),
                torch.cat(ws[6:8]).t().contiguous(),
                ws[8].t().contiguous(),
            )

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.hf.lm_head
        if not self.pack or getattr(head, "bias", None) is not None:
            return head(h).float()
        w = head.weight
        key = (w.data_ptr(), w._version)
        if self._lm is None or self._lm[0] != key:
            self._lm = (key, w.detach().t().contiguous())
        return torch.mm(h, self._lm[1]).float()

    def _rope(self, positions: torch.Tensor, h: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[T, 1, head_dim]`` for ``positions [T]``.

        ``x * cos + roll(x, D/2) * sin_signed`` equals HF's ``x * cos + rotate_half(x) * sin`` exactly
        (``sin_signed`` negates the first half). RoPE is elementwise in the position, so a cached table
        gives the same values as computing them per step.
        """
        rotary = self.hf.model.rotary_emb
        half = self.head_dim // 2
        if self._rope_cacheable:
            cache = self._rope_cache
            if cache is None or cache[0].shape[0] < need or cache[0].dtype != h.dtype:
                n = max(need, 2 * (cache[0].shape[0] if cache is not None else 512))
                cos, sin = rotary(h[None], torch.arange(n, device=self.device)[None])
                cache = self._rope_cache = (cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1))
            cos, sin = cache[0].index_select(0, positions), cache[1].index_select(0, positions)
        else:
            cos, sin = rotary(h[None], positions[None])
            cos, sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return cos[:, None], sin[:, None]

    # ----------------------------------------------------------------- views
    def _keys(self, n: int) -> torch.Tensor:
        """``arange(n)`` (a slice of a cached tensor)."""
        if self._arange.numel() < n:
            self._arange = torch.arange(max(n, 2 * self._arange.numel()), device=self.device)
        return self._arange[:n]

    def _head_offsets(self, cap: int) -> torch.Tensor:
        """``[2 n_kv]``: offsets of each K and V head's rows within a lane of capacity ``cap``."""
        if self._heads is None or self._heads[0] != cap:
            self._heads = (cap, torch.arange(2 * self.n_kv, device=self.device) * cap)
        return self._heads[1]

    def _alloc_views(self, lanes: int, capacity: int) -> None:
        """(Re)allocate the views, keeping the content of the lanes in use."""
        shape = (lanes, 2 * self.n_kv, capacity, self.head_dim)
        old, old_owner = self.kv_view, self.owner
        self.kv_view = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)
        ]
        self.owner = torch.full((lanes, capacity), -1, dtype=torch.long, device=self.device)
        if old and self._lane_keys:
            n = min(len(self._lane_keys), old[0].shape[0])  # lanes past the old count are still empty
            keep = min(capacity, old[0].shape[2])
            for new_t, old_t in zip(self.kv_view, old, strict=True):
                new_t[:n, :, :keep] = old_t[:n, :, :keep]
            self.owner[:n, :keep] = old_owner[:n, :keep]

    @property
    def view_lanes(self) -> int:
        return len(self._lane_keys)

    def view_bytes(self) -> int:
        """Memory allocated for views (all layers, K and V)."""
        return sum(t.numel() * t.element_size() for t in self.kv_view)

    def view_tokens(self) -> int:
        """Tokens held in views (safe to call from another thread: the list is taken in one C call)."""
        return sum(lane.length for lane in list(self._lanes.values()))

    def release(self, key: int) -> None:
        """Drop request ``key``'s view; the last lane moves into its place so that lanes stay ``[0, n)``."""
        lane = self._lanes.pop(key, None)
        if lane is None:
            return
        last = len(self._lane_keys) - 1
        if lane.index != last:
            moved_key = self._lane_keys[last]
            moved = self._lanes[moved_key]
            n = moved.length
            for t in self.kv_view:
                t[lane.index, :, :n] = t[last, :, :n]
            self.owner[lane.index, :n] = self.owner[last, :n]
            moved.index = lane.index
            self._lane_keys[lane.index] = moved_key
        self.owner[last].fill_(-1)
        self._lane_keys.pop()

    def trim(self) -> None:
        """Give view memory back (down to the initial size) when no request holds a view."""
        if not self._lane_keys and (
            self.kv_view[0].shape[2] > self._initial_cap or self.kv_view[0].shape[0] > 8
        ):
            self._alloc_views(8, self._initial_cap)

    @torch.no_grad()
    def check_views(self) -> None:
        """Raise ``AssertionError`` unless every view holds exactly the pool's K/V of its keys' slots."""
        for lane in self._lanes.values():
            if not lane.length:
                continue
            idx = torch.tensor(lane.slots, dtype=torch.long, device=self.device)
            for i in range(self.n_layers):
                view = self.kv_view[i][lane.index, :, : lane.length].transpose(0, 1)  # [L, 2 n_kv, D]
                if not torch.equal(view, self.kv_pool[i].index_select(0, idx)):
                    raise AssertionError(f"lane {lane.index}: view differs from the pool (layer {i})")

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def forward(self, rows: Sequence[Row]) -> torch.Tensor:
        """Logits ``[S, V]`` (float32) of the sampling rows, in the order they appear in ``rows``.

        Writes every query's K/V to its pool slot and to its request's view.
        """
        dev = self.device
        lanes = self._lanes
        by_lane: dict[int, list[tuple[int, Row]]] = {}
        for i, r in enumerate(rows):
            group = by_lane.get(r.lane)
            if group is None:
                by_lane[r.lane] = [(i, r)]
                if r.lane not in lanes:
                    lanes[r.lane] = _Lane(len(self._lane_keys))
                    self._lane_keys.append(r.lane)
            else:
                group.append((i, r))
        n = len(self._lane_keys)
        need = max(lanes[k].length + sum(len(r.tokens) for _, r in rs) for k, rs in by_lane.items())
        cur_lanes, cap = self.kv_view[0].shape[0], self.kv_view[0].shape[2]
        if n > cur_lanes or need > cap:
            while cap < need:
                cap *= 2
            self._alloc_views(cur_lanes if n <= cur_lanes else max(2 * cur_lanes, n), cap)

        # --- flat token order = lane order, each lane's rows (and each row's tokens) contiguous.
        # Per token: id, position, pool slot, view row (lane * 2 n_kv * cap + key), lane cell
        # (lane * cap + key), owner (its branch stream, -1 for trunk), the query's branch (-2 for
        # trunk queries, which own nothing), keys [0, base) visible, own key index: one tensor.
        hkv, d, g = self.n_kv, self.head_dim, self.group
        cols: list[list[int]] = [[] for _ in range(9)]
        ids, pos, write, vrow, cell, own, quid, qbase, qkey = cols
        lane_q: list[tuple[int, int]] = []  # per lane: (first token, number of queries)
        kv_len: list[int] = []
        sample_tok: list[int] = []
        sample_order: list[int] = []
        only_trunk = True
        one_each = True  # every row has a single query
        for li, key in enumerate(self._lane_keys):
            lane = lanes[key]
            t_lane = len(ids)
            for i, r in by_lane.get(key, ()):
                m = len(r.tokens)
                t0 = len(ids)
                p0 = lane.length
                slots = r.table.slots
                new_slots = slots[len(slots) - m :]
                lane.slots.extend(new_slots)
                lane.length = p0 + m
                if m == 1:
                    ids.append(r.tokens[0])
                    pos.append(r.positions[0])
                    write.append(new_slots[0])
                    vrow.append(li * 2 * hkv * cap + p0)
                    cell.append(li * cap + p0)
                    qkey.append(p0)
                else:
                    one_each = False
                    ids.extend(r.tokens)
                    pos.extend(r.positions)
                    write.extend(new_slots)
                    vrow.extend(range(li * 2 * hkv * cap + p0, li * 2 * hkv * cap + p0 + m))
                    cell.extend(range(li * cap + p0, li * cap + p0 + m))
                    qkey.extend(range(p0, p0 + m))
                if r.branch:
                    only_trunk = False
                    own.extend([r.stream] * m)
                    quid.extend([r.stream] * m)
                    qbase.extend([lane.shared_end] * m)
                else:
                    own.extend([-1] * m)
                    quid.extend([-2] * m)
                    qbase.extend(range(p0 + 1, p0 + m + 1))
                    lane.shared_end = lane.length
                if r.sample:
                    sample_tok.append(t0 + m - 1)
                    sample_order.append(i)
            lane_q.append((t_lane, len(ids) - t_lane))
            kv_len.append(max(1, lane.length))
        t = len(ids)
        self.peak_view_tokens = max(self.peak_view_tokens, sum(kv_len))
        per_token = torch.tensor(cols, dtype=torch.long, device=dev)  # [9, T]
        input_ids, positions, write_slots = per_token[0], per_token[1], per_token[2]
        view_dst = (per_token[3][:, None] + self._head_offsets(cap)).reshape(-1)  # [T * 2 n_kv]
        if not only_trunk:  # trunk keys keep the initial -1
            self.owner.view(-1).index_copy_(0, per_token[4], per_token[5])

        # --- which lanes attend together, and their masks. "simple": one query per lane (pure decode;
        # for trunk queries the mask is just each lane's length); "uniform": every lane has the same
        # number of queries (a request's branches decoding), no gather; else queries are gathered and
        # padded.
        k_max = max(kv_len)
        counts = {nq for _, nq in lane_q}
        wide = [li for li, (_, nq) in enumerate(lane_q) if nq > self.small_query_max]
        mode = "gather"
        if not wide and len(counts) == 1:
            mode = "simple" if only_trunk and counts == {1} else "uniform"
        keys = self._keys(k_max)
        kv_len_t = torch.tensor(kv_len, dtype=torch.long, device=dev)
        qtensors = per_token[6:9]  # [3, T]: query branch, base, own key
        # Additive float masks, built once per step (a boolean mask is converted by SDPA in every layer).
        if mode == "simple":
            mask = _additive((keys[None, :] < kv_len_t[:, None])[:, None, None], self.dtype)  # [n, 1, 1, K]
        elif mode == "uniform":
            q_max = t // n
            uid, base, qk = qtensors.view(3, n, q_max).unbind(0)
            allowed = _visible(keys, base, uid, None if one_each else qk, self.owner[:n, :k_max])  # [n, Q, K]
            if q_max == 1:  # one query per lane (a last live branch): the pure-decode layout
                mode = "simple"
                mask = _additive(allowed[:, None], self.dtype)  # [n, 1, 1, K]
            elif n == 1 and one_each and q_max <= _EXPAND_MAX:
                # A few branches of one request: each query its own batch entry over the same (expanded,
                # not copied) keys. SDPA re-reads the keys per query, but no query/output permutes.
                mode = "expand"
                mask = _additive(allowed.view(q_max, 1, 1, k_max), self.dtype)
            else:
                mask = _additive(allowed[:, None].repeat(1, 1, g, 1), self.dtype)  # rows: (member, query)
        else:
            q_max = max([1] + [nq for _, nq in lane_q if nq <= self.small_query_max])
            gather, valid = [], []
            for t0, nq in lane_q:
                if nq > self.small_query_max:
                    nq = 0
                gather.extend(range(t0, t0 + nq))
                gather.extend([0] * (q_max - nq))
                valid.extend([True] * nq + [False] * (q_max - nq))
            gather_t = torch.tensor(gather, dtype=torch.long, device=dev)
            valid_t = torch.tensor(valid, dtype=torch.bool, device=dev).view(n, q_max)
            picked = qtensors.index_select(1, gather_t).view(3, n, q_max)
            # Padded queries (and lanes without small queries) see all their lane's keys; discarded.
            uid = torch.where(valid_t, picked[0], -2)
            base = torch.where(valid_t, picked[1], kv_len_t[:, None])
            qk = torch.where(valid_t, picked[2], 0)
            allowed = _visible(keys, base, uid, qk, self.owner[:n, :k_max])  # [n, Qmax, K]
            mask = _additive(allowed[:, None].repeat(1, 1, g, 1), self.dtype)  # rows: (group member, query)
            scatter = gather_t[valid_t.view(-1)]
            out_rows = valid_t.view(-1).nonzero().squeeze(1)
        wide_masks = []
        for li in wide:
            t0, nq = lane_q[li]
            uid, base, qk = qtensors[:, t0 : t0 + nq, None].unbind(0)  # each [nq, 1]
            ok = _visible(keys[: kv_len[li]], base.T, uid.T, qk.T, self.owner[li : li + 1, : kv_len[li]])
            wide_masks.append(_additive(ok[:, None], self.dtype))  # [1, 1, nq, K]

        # --- the layers
        inner = self.hf.model
        h = inner.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self._rope(positions, h, max(pos) + 1)  # [T, 1, D]
        weights = self._layer_weights()
        hq = self.n_heads * d
        hk = hkv * d
        n_qk = self.n_heads + hkv
        half = d // 2
        eps = self._qk_eps
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            pw = weights[i]
            x = _rms(layer.input_layernorm, h)
            if pw.qkv_t is not None:
                qkv = torch.mm(x, pw.qkv_t)
                qk = qkv[:, : hq + hk].view(t, n_qk, d)
                v = qkv[:, hq + hk :].view(t, hkv, d)
            else:
                qk = torch.cat([attn.q_proj(x), attn.k_proj(x)], dim=-1).view(t, n_qk, d)
                v = attn.v_proj(x).view(t, hkv, d)
            # q_norm and k_norm in one op (per-head RMS; the weights are stacked per head)
            if qk.dtype == torch.float32:
                qk = F.rms_norm(qk, (d,), None, eps) * pw.qk_norm
            else:
                qk = F.rms_norm(qk.float(), (d,), None, eps).to(qk.dtype) * pw.qk_norm
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)
            q = qk[:, : self.n_heads]
            new_kv = torch.cat([qk[:, self.n_heads :], v], dim=1)  # [T, 2 n_kv, D]
            self.kv_pool[i].index_copy_(0, write_slots, new_kv)
            lanes_kv = self.kv_view[i]
            lanes_kv.view(-1, d).index_copy_(0, view_dst, new_kv.view(-1, d))
            kview, vview = lanes_kv[:n, :hkv, :k_max], lanes_kv[:n, hkv:, :k_max]  # [n, n_kv, K, D], no copy
            if mode == "simple":
                og = F.scaled_dot_product_attention(
                    q.view(n, hkv, g, d), kview, vview, attn_mask=mask, scale=self.scaling
                )
                out = og.reshape(t, hq)
            elif mode == "expand":
                og = F.scaled_dot_product_attention(
                    q.view(t, hkv, g, d),
                    kview.expand(t, -1, -1, -1),
                    vview.expand(t, -1, -1, -1),
                    attn_mask=mask,
                    scale=self.scaling,
                )
                out = og.reshape(t, hq)
            elif mode == "uniform":
                qg = q.view(n, q_max, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(n, hkv, g * q_max, d)
                og = F.scaled_dot_product_attention(qg, kview, vview, attn_mask=mask, scale=self.scaling)
                out = og.view(n, hkv, g, q_max, d).permute(0, 3, 1, 2, 4).reshape(t, hq)
            else:
                qg = q.index_select(0, gather_t).view(n, q_max, hkv, g, d).permute(0, 2, 3, 1, 4)
                og = F.scaled_dot_product_attention(
                    qg.reshape(n, hkv, g * q_max, d), kview, vview, attn_mask=mask, scale=self.scaling
                )
                og = og.view(n, hkv, g, q_max, d).permute(0, 3, 1, 2, 4).reshape(n * q_max, hq)
                out = torch.empty(t, hq, dtype=q.dtype, device=dev)
                out.index_copy_(0, scatter, og.index_select(0, out_rows))
                for li, wm in zip(wide, wide_masks, strict=True):
                    t0, nq = lane_q[li]
                    ol = F.scaled_dot_product_attention(
                        q[t0 : t0 + nq].transpose(0, 1)[None],
                        lanes_kv[li : li + 1, :hkv, : kv_len[li]],
                        lanes_kv[li : li + 1, hkv:, : kv_len[li]],
                        attn_mask=wm,
                        scale=self.scaling,
                        enable_gqa=True,
                    )
                    out[t0 : t0 + nq] = ol[0].transpose(0, 1).reshape(nq, hq)
            if pw.o_t is not None:
                h = h + torch.mm(out, pw.o_t)
                gate, up = torch.mm(_rms(layer.post_attention_layernorm, h), pw.gate_up_t).chunk(2, dim=-1)
                h = h + torch.mm(F.silu(gate) * up, pw.down_t)
            else:
                h = h + attn.o_proj(out)
                h = h + mlp(_rms(layer.post_attention_layernorm, h))
        if not sample_tok:
            return torch.empty(0, self.vocab_size, device=dev)
        if len(sample_tok) != t:
            h = h.index_select(0, torch.tensor(sample_tok, dtype=torch.long, device=dev))
        logits = self._logits(_rms(inner.norm, h))
        if sample_order != sorted(sample_order):
            perm = sorted(range(len(sample_order)), key=sample_order.__getitem__)
            logits = logits.index_select(0, torch.tensor(perm, dtype=torch.long, device=dev))
        return logits

    @property
    def vocab_size(self) -> int:
        return self.hf.get_output_embeddings().weight.shape[0]

    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv * self.head_dim * self.kv_pool[0].element_size()


def _visible(
    j: torch.Tensor, base: torch.Tensor, uid: torch.Tensor, qkey: torch.Tensor | None, owner: torch.Tensor
) -> torch.Tensor:
    """``[n, Q, K]`` bool: key j is visible to a query iff j < base, or the query's branch wrote key j
    at or before the query's own key (``j = arange(K)``, ``base/uid/qkey [n, Q]``, ``owner [n, K]``).
    ``qkey=None``: each branch has one query this step, its newest key, so "at or before" holds."""
    own = owner[:, None, :] == uid[:, :, None]
    if qkey is not None:
        own &= j[None, None, :] <= qkey[:, :, None]
    return own.logical_or_(j[None, None, :] < base[:, :, None])


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, the dtype's minimum elsewhere (every query row allows at least one key)."""
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a Qwen3 RMSNorm (same math: float32 statistics, then the weight)."""
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if w is None or eps is None or type(norm).__name__ != "Qwen3RMSNorm":
        return norm(x)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
