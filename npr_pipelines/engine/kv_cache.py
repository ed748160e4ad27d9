"""Paged KV bookkeeping: a pool of reference-counted blocks and per-stream tables of slots.

Slot ``s`` lives in block ``s // block_size`` at offset ``s % block_size``; the tensors themselves
(``[num_blocks * block_size, n_kv_heads, head_dim]`` per layer) belong to the model backend. A
``KVTable`` is one stream's view: token i of the stream's context has its KV at ``slots[i]``, and the
table holds one reference on every block it reads.

* Fork: each branch table is a copy of the trunk's table (one more reference per block). Nothing is
  copied: the prefix's partial last block is shared read-only, and a branch writes its own tokens into
  fresh blocks, because a block is only ever appended to by its sole holder. (Copy-on-write of that
  block would have to run before the fork's own ``</guideline>`` KV is computed, in the same step.)
* Join: the continuation's table is the first branch's table (prefix + branch 1) followed by the
  slots of branches 2..k after the prefix; only the inserted ``<takeaway>`` gets new slots.

A table needs no contiguity (the backend's per-request views are what attention reads, see
``model.py``); the price of never copying is at most one partially filled block per branch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch


class OutOfBlocks(RuntimeError):
    """No free block left in the pool."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refcount = [0] * num_blocks
        self.fill = [0] * num_blocks  # slots handed out in each block
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        b = self._free.pop()
        self.refcount[b] = 1
        self.fill[b] = 0
        return b

    def incref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise AssertionError(f"incref of free block {block}")
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise AssertionError(f"decref of free block {block}")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.fill[block] = 0
            self._free.append(block)


class KVTable:
    """One stream's KV view. Holds one reference on each block in ``blocks`` until ``release``."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.slots: list[int] = []
        self.blocks: list[int] = []  # distinct
        self.released = False
        self._tensor: torch.Tensor | None = None  # cached slots[:len(_tensor)] on some device

    def __len__(self) -> int:
        return len(self.slots)

    def append(self, n: int) -> list[int]:
        """Slots for ``n`` new tokens: the last block while we alone hold it and it has room, else fresh."""
        assert not self.released
        pool, bs = self.pool, self.pool.block_size
        if n == 1 and self.slots:  # the decode step's case, without the loop
            last = self.slots[-1]
            b = last // bs
            nxt = last - b * bs + 1
            if nxt < bs and pool.refcount[b] == 1 and pool.fill[b] == nxt:
                pool.fill[b] = nxt + 1
                self.slots.append(last + 1)
                return [last + 1]
        out = []
        for _ in range(n):
            slot = None
            if self.slots:
                last = self.slots[-1]
                b, nxt = last // bs, last % bs + 1
                if pool.refcount[b] == 1 and pool.fill[b] == nxt and nxt < bs:
                    slot = last + 1
                    pool.fill[b] += 1
            if slot is None:
                b = pool.allocate()
                self.blocks.append(b)
                pool.fill[b] = 1
                slot = b * bs
            self.slots.append(slot)
            out.append(slot)
        return out

    def fork(self) -> KVTable:
        """A new holder of exactly this view (the prefix is shared by reference)."""
        assert not self.released
        child = KVTable(self.pool)
        child.slots = list(self.slots)
        child.blocks = list(self.blocks)
        child._tensor = self._tensor
        for b in child.blocks:
            self.pool.incref(b)
        return child

    @classmethod
    def concat(cls, pool: BlockPool, parts: Sequence[tuple[KVTable, int]]) -> KVTable:
        """A view of ``part.slots[start:]`` for each ``(part, start)`` in order, holding their blocks."""
        table = cls(pool)
        bs = pool.block_size
        seen: dict[int, None] = {}
        for part, start in parts:
            assert not part.released
            piece = part.slots[start:]
            table.slots.extend(piece)
            for b in part.blocks if start == 0 else (s // bs for s in piece):
                seen.setdefault(b, None)
        table.blocks = list(seen)
        for b in table.blocks:
            pool.incref(b)
        return table

    def release(self) -> None:
        if self.released:
            return
        for b in self.blocks:
            self.pool.decref(b)
        self.released = True

    def slots_tensor(self, device: torch.device) -> torch.Tensor:
        """``[len(self)]`` int64 slot indices on ``device`` (extended incrementally, shared with forks)."""
        cached = self._tensor
        if cached is None or cached.device != device:
            cached = torch.tensor(self.slots, dtype=torch.long, device=device)
        elif len(cached) < len(self.slots):
            tail = torch.tensor(self.slots[len(cached) :], dtype=torch.long, device=device)
            cached = torch.cat([cached, tail])
        self._tensor = cached
        return cached[: len(self.slots)]


def check_invariants(pool: BlockPool, tables: Iterable[KVTable]) -> None:
    """Raise ``AssertionError`` unless the pool and the live tables agree.

    Nothing is both free and referenced; every block's reference count equals the number of live
    tables holding it; every slot a table reads lies in a block it holds, within the block's fill.
    """
    live = [t for t in tables if not t.released]
    holders: Counter[int] = Counter()
    for t in live:
        if len(set(t.blocks)) != len(t.blocks):
            raise AssertionError(f"a table holds a block twice: {t.blocks}")
        holders.update(t.blocks)
        held = set(t.blocks)
        bs = pool.block_size
        for s in t.slots:
            b = s // bs
            if b not in held:
                raise AssertionError(f"slot {s} read from block {b}, which the table does not hold")
            if s % bs >= pool.fill[b]:
                raise AssertionError(f"slot {s} beyond the fill ({pool.fill[b]}) of block {b}")
    free = pool._free
    if len(set(free)) != len(free):
        raise AssertionError("a block is on the free list twice")
    free_set = set(free)
    for b in range(pool.num_blocks):
        rc = pool.refcount[b]
        if rc != holders.get(b, 0):
            raise AssertionError(f"block {b}: refcount {rc} but {holders.get(b, 0)} holders")
        if (rc == 0) != (b in free_set):
            raise AssertionError(
                f"block {b}: refcount {rc} but {'on' if b in free_set else 'off'} the free list"
            )
