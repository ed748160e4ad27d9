"""Loss aggregation and policy losses: hand-computed values, gradient checks, masks honoured."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from npr_pipelines.rl import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    UnknownNameError,
    broadcast_to_tokens,
    dapo_policy_loss,
    get_loss_agg,
    get_policy_loss,
    loss_mask,
    papo_policy_loss,
)

METRIC_KEYS = {"clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean"}


def T(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_()


def random_batch(seed: int = 0, b: int = 3, t: int = 5):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen) * 3
    old = logp + 0.3 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, 1, generator=gen).expand(b, t).clone()
    return logp, old, adv


# ---------------------------------------------------------------------------------------- masks


def test_loss_mask_drops_engine_inserted_tokens() -> None:
    response = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    inserted = torch.tensor([[0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert loss_mask(response, inserted).tolist() == [[False, True, False, False, True, False]]
    assert loss_mask(response.float()).tolist() == response.tolist()
    with pytest.raises(ValueError):
        loss_mask(response, inserted[:, :3])


# ---------------------------------------------------------------------------------- aggregation

LOSS = T([1, 2, 3], [4, 5, 6], [7, 8, 9])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 2 has no token


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 4) / 3),
        ("seq-mean-token-sum", ((1 + 2) + 4) / 2),
        ("seq-mean-token-mean", ((1 + 2) / 2 + 4) / 2),
    ],
)
def test_aggregation_hand_values(mode: str, expected: float) -> None:
    agg = get_loss_agg(mode)
    assert_close(agg(LOSS, MASK), torch.tensor(expected))
    assert_close(agg(LOSS, MASK.float()), torch.tensor(expected))


def test_aggregation_denominators() -> None:
    assert_close(get_loss_agg("token-mean")(LOSS, MASK, denominator=10), torch.tensor(0.7))
    assert_close(get_loss_agg("seq-mean-token-sum")(LOSS, MASK, denominator=4), torch.tensor(7 / 4))
    assert_close(get_loss_agg("seq-mean-token-mean")(LOSS, MASK, denominator=4), torch.tensor(5.5 / 4))


@pytest.mark.parametrize(
    ("mode", "count"),
    [
        ("token-mean", lambda m: m.sum()),
        ("seq-mean-token-sum", lambda m: m.any(-1).sum()),
        ("seq-mean-token-mean", lambda m: m.any(-1).sum()),
    ],
)
def test_micro_batches_with_the_full_denominator_add_up_to_the_full_batch(mode: str, count) -> None:
    gen = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 7, generator=gen)
    mask = torch.rand(6, 7, generator=gen) > 0.4
    agg = get_loss_agg(mode)
    full = agg(loss, mask)
    n = float(count(mask))
    parts = [agg(loss[i : i + 2], mask[i : i + 2], denominator=n) for i in range(0, 6, 2)]
    assert_close(sum(parts), full)


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS.names()))
def test_aggregation_of_an_empty_mask_is_zero_with_zero_gradient(mode: str) -> None:
    x = leaf(torch.ones(2, 3))
    out = get_loss_agg(mode)(x, torch.zeros(2, 3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0
    assert_close(x.grad, torch.zeros(2, 3))


def test_unknown_aggregation_mode_is_refused() -> None:
    logp, old, adv = random_batch()
    with pytest.raises(UnknownNameError, match="token-mean"):
        dapo_policy_loss(logp, old, adv, torch.ones_like(logp), agg_mode="token-sum")


# ---------------------------------------------------------------------------------------- DAPO

RATIOS = [1.1, 1.5, 0.5, 0.5, 1.1, 20.0]
ADVS = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
# Per token: in range; A>0 above 1+0.28 (clipped); A>0 below 1-0.2 (pessimistic: unclipped);
# A<0 below 1-0.2 (clipped); A<0 in range; A<0 with ratio 20 (dual clip at c|A| = 10).
DAPO_TOKEN_LOSS = [-1.1, -1.28, -0.5, 0.8, 1.1, 10.0]
DAPO_TOKEN_GRAD = [-1.1, 0.0, -0.5, 0.0, 1.1, 0.0]  # d(-A rho)/dlogp = -A rho; clipped tokens: 0


def dapo_inputs():
    old = T([-1.0] * 6)
    logp = leaf(old + torch.log(T(RATIOS)))
    return logp, old, T(ADVS), torch.ones(1, 6, dtype=torch.bool)


def test_dapo_hand_values_gradients_and_metrics() -> None:
    logp, old, adv, mask = dapo_inputs()
    loss, metrics = dapo_policy_loss(logp, old, adv, mask)
    assert_close(loss, torch.tensor(sum(DAPO_TOKEN_LOSS) / 6))
    loss.backward()
    assert_close(logp.grad, T(DAPO_TOKEN_GRAD) / 6)
    assert set(metrics) == METRIC_KEYS
    assert_close(metrics["clip_frac"], torch.tensor(2 / 6))
    assert_close(metrics["dual_clip_frac"], torch.tensor(1 / 6))
    assert_close(metrics["approx_kl"], torch.tensor(-sum(math.log(r) for r in RATIOS) / 6))
    assert_close(metrics["ratio_mean"], torch.tensor(sum(RATIOS) / 6))
    assert not any(v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("ratio", [10.5, 50.0, 1e3, math.exp(30)])
def test_dual_clip_caps_negative_advantage_loss_at_c_abs_a(ratio: float) -> None:
    old = T([-2.0])
    logp = leaf(old + math.log(ratio))
    loss, metrics = dapo_policy_loss(logp, old, T([-2.0]), torch.ones(1, 1), clip_c=10.0)
    assert_close(loss, torch.tensor(20.0))
    loss.backward()
    assert_close(logp.grad, T([0.0]))
    assert metrics["dual_clip_frac"].item() == 1.0


def test_dual_clip_spares_ratios_below_c_and_positive_advantages() -> None:
    old = T([-2.0, -2.0])
    logp = old + math.log(9.0)
    loss, metrics = dapo_policy_loss(logp, old, T([-2.0, 0.0]), torch.tensor([[1, 0]]))
    assert_close(loss, torch.tensor(18.0))  # 9 < c: plain -A rho
    assert metrics["dual_clip_frac"].item() == 0.0
    loss, _ = dapo_policy_loss(old + math.log(20.0), old, T([1.0, 1.0]), torch.ones(1, 2))
    assert_close(loss, torch.tensor(-1.28))  # A > 0: the ordinary upper clip, no dual clip


def test_dapo_argument_checks() -> None:
    logp, old, adv = random_batch()
    mask = torch.ones_like(logp)
    with pytest.raises(ValueError, match="old_logp"):
        dapo_policy_loss(logp, None, adv, mask)
    with pytest.raises(ValueError, match="clip_c"):
        dapo_policy_loss(logp, old, adv, mask, clip_c=1.0)
    with pytest.raises(ValueError, match="must match"):
        dapo_policy_loss(logp, old[:, :2], adv, mask)


# ---------------------------------------------------------------------------------------- PAPO


def test_papo_value_and_gradient_are_reinforce_with_token_mean() -> None:
    logp0, old, adv = random_batch(seed=3, b=4, t=6)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(4)) > 0.3
    n = mask.sum()
    logp = leaf(logp0)
    loss, metrics = papo_policy_loss(logp, old, adv, mask)
    assert_close(loss, -(adv * mask).sum() / n)
    loss.backward()
    assert_close(logp.grad, -adv * mask / n)
    assert set(metrics) == METRIC_KEYS
    assert metrics["clip_frac"].item() == 0.0 and metrics["dual_clip_frac"].item() == 0.0
    assert metrics["ratio_mean"].item() == 1.0
    assert_close(metrics["approx_kl"], ((old - logp0) * mask).sum() / n)


def test_papo_parameter_gradient_is_minus_a_grad_logp_over_n() -> None:
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(5, 4, generator=gen).requires_grad_()  # a tiny "model": vocab 5, hidden 4
    hidden = torch.randn(2, 3, 4, generator=gen)
    tokens = torch.randint(0, 5, (2, 3), generator=gen)

    def logp_of_sampled() -> torch.Tensor:
        return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)

    adv = broadcast_to_tokens(torch.tensor([1.5, -0.5]), torch.ones(2, 3))
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    loss, _ = papo_policy_loss(logp_of_sampled(), None, adv, mask)
    (got,) = torch.autograd.grad(loss, weight)
    expected = torch.zeros_like(weight)
    for b, t in mask.nonzero().tolist():
        (grad_logp,) = torch.autograd.grad(logp_of_sampled()[b, t], weight)
        expected -= adv[b, t] * grad_logp / mask.sum()
    assert_close(got, expected)


def test_papo_gradient_with_seq_mean_token_mean() -> None:
    logp0, _, adv = random_batch(seed=5, b=3, t=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    logp = leaf(logp0)
    loss, _ = papo_policy_loss(logp, None, adv, mask, agg_mode="seq-mean-token-mean")
    loss.backward()
    per_seq = mask.sum(-1, keepdim=True)
    assert_close(logp.grad, -adv * mask / per_seq / 3)


def test_papo_ignores_old_logp_and_reports_zero_drift_without_it() -> None:
    logp, old, adv = random_batch(seed=6)
    mask = torch.ones_like(logp)
    with_old, m1 = papo_policy_loss(logp, old, adv, mask)
    without, m2 = papo_policy_loss(logp, None, adv, mask)
    assert_close(with_old, without)
    assert m2["approx_kl"].item() == 0.0 and m1["approx_kl"].item() != 0.0


def test_papo_equals_the_release_dapo_call_with_detached_old_logp() -> None:
    # The release keeps the PPO loss but passes old = sg(logp): rho == 1, every clip branch inert.
    logp0, _, adv = random_batch(seed=7, b=4, t=5)
    adv[0] = -50.0  # large advantages do not trigger any clip either
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(8)) > 0.2
    a, b = leaf(logp0), leaf(logp0)
    papo, _ = papo_policy_loss(a, None, adv, mask)
    dapo, metrics = dapo_policy_loss(b, b.detach(), adv, mask, clip_low=0.2, clip_high=0.2)
    assert_close(papo, dapo)
    papo.backward()
    dapo.backward()
    assert_close(a.grad, b.grad)
    assert metrics["clip_frac"].item() == 0.0 and metrics["dual_clip_frac"].item() == 0.0


# ----------------------------------------------------------------------- masks, for every loss


@pytest.mark.parametrize("agg_mode", sorted(LOSS_AGGREGATIONS.names()))
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES.names()))
def test_masked_tokens_contribute_nothing(name: str, agg_mode: str) -> None:
    """Prompt, padding and engine-inserted positions hold garbage; neither value nor gradient moves."""
    logp0, old, adv = random_batch(seed=9, b=3, t=8)
    response = torch.ones(3, 8, dtype=torch.bool)
    response[:, :2] = False  # prompt
    response[2, 6:] = False  # padding
    inserted = torch.zeros(3, 8, dtype=torch.bool)
    inserted[0, 3:5] = True  # "\n<step>\n1:" written by the engine at a fork
    inserted[1, 7] = True  # "<takeaway>\n" written at a join
    mask = loss_mask(response, inserted)
    loss_fn = get_policy_loss(name)

    clean = leaf(logp0)
    ref, ref_metrics = loss_fn(clean, old, adv, mask, agg_mode=agg_mode)
    ref.backward()

    dirty0 = logp0.clone()
    dirty0[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6]).repeat(8)[
        : int((~mask).sum())
    ]
    old_dirty = old.clone()
    old_dirty[~mask] = float("nan")
    dirty = leaf(dirty0)
    got, got_metrics = loss_fn(dirty, old_dirty, adv * 100 * (~mask) + adv, mask, agg_mode=agg_mode)
    got.backward()

    assert_close(got, ref)
    assert_close(dirty.grad, clean.grad)
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[~mask] == 0).all()
    assert (dirty.grad[inserted] == 0).all()
    assert_close(got_metrics, ref_metrics)

    # Counting the engine-inserted tokens as actions (what the release does) trains them.
    release = leaf(logp0)
    loss_fn(release, old, adv, response, agg_mode=agg_mode)[0].backward()
    assert (release.grad[inserted] != 0).all()


@pytest.mark.parametrize("agg_mode", sorted(LOSS_AGGREGATIONS.names()))
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES.names()))
def test_zero_advantage_rows_add_no_gradient(name: str, agg_mode: str) -> None:
    """The registry's contract that lets the trainer leave zero-advantage sequences out of the backward
    pass (``RLConfig.skip_zero_advantage``): with the denominator fixed, dropping them changes nothing."""
    logp0, old, adv = random_batch(seed=4, b=4, t=6)
    adv[1] = 0.0
    adv[3] = 0.0
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[3, 4:] = False
    loss_fn = get_policy_loss(name)
    denominator = float(mask.sum()) if agg_mode == "token-mean" else 4.0

    full = leaf(logp0)
    loss_full, _ = loss_fn(full, old, adv, mask, agg_mode=agg_mode, denominator=denominator)
    loss_full.backward()
    assert (full.grad[[1, 3]] == 0).all() and (full.grad[[0, 2]] != 0).any()

    kept = [0, 2]
    part = leaf(logp0[kept])
    loss_part, _ = loss_fn(part, old[kept], adv[kept], mask[kept], agg_mode=agg_mode, denominator=denominator)
    loss_part.backward()
    assert_close(loss_part, loss_full)
    assert_close(part.grad, full.grad[kept])
