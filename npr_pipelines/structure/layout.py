"""The parallel layout: position ids and attention visibility of a flattened parallel trace.

This is the one rule shared by the trainer (SFT, PAPO log-prob recomputation) and the engine:

* Tokens outside steps ("shared": prompt, guidelines, takeaways, answers) get consecutive positions
  and see every earlier token.
* The k sibling steps of a block are branches. Each starts at ``branch_start_position(p)`` = p + 1, where
  p is the position of the last shared token before the block's first step (normally ``</guideline>``),
  so all siblings share their first position. A branch runs from its ``<step>`` through the last token
  before the next sibling's ``<step>`` (or the block's ``<takeaway>``): a separator between siblings,
  if a text-rendered trace has one, belongs to the step before it and is therefore invisible to the
  other siblings, exactly as in the engine, which never decodes a separator there.
* A branch token sees the shared tokens before it and the earlier tokens of its own branch, never a
  sibling. The takeaway starts at ``join_position`` = one past the last position of the longest
  sibling, and it and everything after see all siblings.

In flattened order this is causal attention minus sibling-to-sibling visibility. ``ParallelLayout``
keeps it compact (a list of segments); ``additive_mask`` materialises a dense float mask for small
inputs (a boolean 4-D mask is silently wrong under ``eager`` attention, so never pass one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from npr_pipelines.structure.parser import SpanTable

# Above this many tokens a dense L x L mask is refused: use the segment description instead.
DENSE_MASK_MAX_TOKENS = 8192
_LAYOUT_BREAKING = {"unclosed", "nested_guideline"}


class LayoutError(ValueError):
    """The span table cannot be laid out (truncated or nested structure)."""


def branch_start_position(last_shared_position: int) -> int:
    """Position of the first token of every sibling branch."""
    return last_shared_position + 1


def join_position(branch_last_positions: Sequence[int]) -> int:
    """Position of the first token after a join (the takeaway)."""
    if not branch_last_positions:
        raise LayoutError("a join needs at least one branch")
    return max(branch_last_positions) + 1


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` with positions ``position, position+1, ...``.

    ``block``/``branch`` are set for a step branch (block index, sibling index) and None for shared.
    """

    start: int
    end: int
    position: int
    block: int | None = None
    branch: int | None = None

    @property
    def is_branch(self) -> bool:
        return self.block is not None

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ParallelLayout:
    segments: tuple[Segment, ...]
    length: int

    @cached_property
    def position_ids(self) -> list[int]:
        out: list[int] = []
        for seg in self.segments:
            out.extend(range(seg.position, seg.position + len(seg)))
        return out

    @cached_property
    def branch_of_token(self) -> list[int]:
        """Per token: -1 for shared tokens, else a key unique to its (block, branch)."""
        out: list[int] = []
        for seg in self.segments:
            key = -1 if seg.block is None else seg.block * 1024 + (seg.branch or 0)
            out.extend([key] * len(seg))
        return out

    def sees(self, query: int, key: int) -> bool:
        """Whether token ``query`` attends to token ``key`` (both flattened indices)."""
        if key > query:
            return False
        bq, bk = self.branch_of_token[query], self.branch_of_token[key]
        return bq == -1 or bk == -1 or bq == bk or bq // 1024 != bk // 1024

    def visible_segments(self, index: int) -> list[int]:
        """Indices of the segments that segment ``index`` sees (itself included, causally)."""
        me = self.segments[index]
        return [
            j
            for j, other in enumerate(self.segments[: index + 1])
            if not (
                me.is_branch and other.is_branch and other.block == me.block and other.branch != me.branch
            )
        ]

    def visibility(self) -> torch.Tensor:
        """Dense boolean [L, L] matrix, True = may attend (for tests and small inputs)."""
        n = self.length
        if n > DENSE_MASK_MAX_TOKENS:
            raise LayoutError(
                f"dense mask of {n} tokens refused (> {DENSE_MASK_MAX_TOKENS}); use the segments"
            )
        keys = torch.tensor(self.branch_of_token, dtype=torch.long)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        q, k = keys[:, None], keys[None, :]
        siblings = (q != -1) & (k != -1) & (q != k) & (q // 1024 == k // 1024)
        return causal & ~siblings

    def additive_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float mask of shape [1, 1, L, L]: 0 where allowed, the dtype's minimum where blocked."""
        allowed = self.visibility()
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


def sequential_layout(length: int) -> ParallelLayout:
    """Plain causal layout (sequential SFT, sequential-mode traces)."""
    return ParallelLayout((Segment(0, length, 0),), length) if length else ParallelLayout((), 0)


def parallel_layout(table: SpanTable, length: int | None = None) -> ParallelLayout:
    """Layout of a whole flattened sequence from its span table.

    ``table`` offsets are absolute (parse with ``offset=prompt_len``), so tokens before the first block
    (the prompt) are shared. Content violations (numbering, empty items, ...) do not matter here; a
    truncated or nested structure raises ``LayoutError``.
    """
    length = table.length if length is None else length
    broken = [v for v in table.violations if v.rule in _LAYOUT_BREAKING]
    if broken:
        raise LayoutError("cannot lay out a trace with " + "; ".join(str(v) for v in broken))
    segments: list[Segment] = []
    cursor, next_pos = 0, 0
    for b_idx, block in enumerate(table.blocks):
        if not block.steps:
            continue  # a block without steps is shared text throughout
        first = block.steps[0].span.start
        if first > cursor:
            segments.append(Segment(cursor, first, next_pos))
            next_pos += first - cursor
        start_pos = branch_start_position(next_pos - 1)
        bounds = [s.span.start for s in block.steps] + [block.takeaway.span.start]
        last_positions = []
        for k in range(len(block.steps)):
            seg = Segment(bounds[k], bounds[k + 1], start_pos, b_idx, k)
            segments.append(seg)
            last_positions.append(start_pos + len(seg) - 1)
        cursor, next_pos = bounds[-1], join_position(last_positions)
    if cursor < length:
        segments.append(Segment(cursor, length, next_pos))
    return ParallelLayout(tuple(segments), length)
