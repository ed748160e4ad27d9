"""Top-k / top-p truncation: the candidate-ranked fast path keeps exactly the tokens that sorting the
whole vocabulary keeps, for every mix of settings, and falls back to the sort when a nucleus is wide."""

from __future__ import annotations

import pytest
import torch

from npr_pipelines.engine import sampling
from npr_pipelines.engine.sampling import NUCLEUS_CANDIDATES, UniformDraws, truncate, truncate_sorted


def _reference(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    v = logits.shape[1]
    k = torch.tensor([kk if 0 < kk < v else v for kk in top_k])
    return truncate_sorted(logits, k, torch.tensor([pp if pp < 1 else float("inf") for pp in top_p]))


def _by_row_loop(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """The definition, one row at a time in plain Python."""
    out = torch.full_like(logits, float("-inf"))
    for r, row in enumerate(logits.tolist()):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        if top_k[r]:
            order = order[: top_k[r]]
        z = torch.tensor([row[j] for j in order]).softmax(0).tolist()
        mass = 0.0
        for j, pj in zip(order, z, strict=True):
            if mass > top_p[r] + 1e-6:
                break
            out[r, j] = row[j]
            mass += pj
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [0.3, 2.0, 8.0])  # flat (nucleus past the candidates) to peaked
def test_truncate_matches_the_full_sort(seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, v = 40, 392
    logits = torch.randn(rows, v, generator=g) * scale
    logits[::7, 100:] = float("-inf")  # masked tokens (a logits hook) are never kept
    cases = [
        ([0] * rows, [0.7] * rows),
        ([0] * rows, [float(x) for x in torch.rand(rows, generator=g).clamp(0.05, 1.0)]),
        ([5] * rows, [0.9] * rows),
        ([int(x) for x in torch.randint(0, 40, (rows,), generator=g)], [0.8] * rows),  # mixed top-k
        ([0] * (rows - 1) + [3], [1.0] * (rows - 1) + [0.5]),
        ([7] * rows, [1.0] * rows),  # top-p off: exactly the top-k
    ]
    for top_k, top_p in cases:
        got = truncate(logits, top_k, top_p)
        assert torch.equal(got.isfinite(), _reference(logits, top_k, top_p).isfinite())
        assert torch.equal(got[got.isfinite()], logits[got.isfinite()])  # kept logits unchanged
        off = torch.tensor([kk == 0 and pp == 1.0 for kk, pp in zip(top_k, top_p, strict=True)])
        assert torch.equal(got[off], logits[off])  # neither top-k nor top-p: the row untouched
    small = logits[:6, :60]
    assert torch.equal(
        truncate(small, [0] * 6, [0.6] * 6).isfinite(), _by_row_loop(small, [0] * 6, [0.6] * 6).isfinite()
    )


def test_only_wide_rows_are_sorted_and_a_row_never_depends_on_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sorted_rows: list[int] = []
    real = sampling.truncate_sorted

    def counting(logits, k, p):
        sorted_rows.append(logits.shape[0])
        return real(logits, k, p)

    monkeypatch.setattr(sampling, "truncate_sorted", counting)
    peaked = torch.zeros(3, 200)
    peaked[:, 0] = 10.0
    flat = torch.zeros(2, 200)  # 0.7 of a uniform 200-token row is 140 tokens, past the candidates
    alone = truncate(peaked, [0] * 3, [0.7] * 3)
    assert sorted_rows == []
    mixed = truncate(torch.cat([peaked, flat]), [0, 0, 0, 0, 30], [0.7] * 4 + [1.0])
    assert sorted_rows == [2]  # the flat rows only
    assert torch.equal(mixed[:3], alone)
    assert mixed[3].isfinite().sum() == 141 and mixed[4].isfinite().sum() == 30
    assert NUCLEUS_CANDIDATES < 30


@pytest.mark.parametrize("block", [1, 7, 32])
def test_block_draws_are_the_one_at_a_time_draws(block: int) -> None:
    """Engine outputs stay those of one generator draw per sampled token (the RNG contract)."""
    one_at_a_time = torch.Generator().manual_seed(2024)
    expected = [torch.rand((), generator=one_at_a_time).item() for _ in range(200)]
    draws = UniformDraws(torch.Generator().manual_seed(2024), block=block)
    assert [draws.next() for _ in range(200)] == expected
