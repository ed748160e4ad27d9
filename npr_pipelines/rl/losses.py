"""Loss aggregation modes and policy losses: DAPO's clipped surrogate (stage 1, ``method.md`` §2.1)
and PAPO's ratio-free on-policy loss (stage 3, §4.6).

Shapes: ``B`` sequences, ``T`` padded response positions. ``mask [B, T]`` (bool, or 0/1 float —
any nonzero counts as included) selects the tokens that are trained on. It must exclude the prompt,
padding AND engine-inserted tokens (the ``"\\n<step>\\nk:"`` branch headers and ``"<takeaway>\\n"``
the NPR Engine writes at forks and joins, §4.2): the policy did not sample them, so they are not
actions and ``log pi`` of a forced token is not a score-function term of the sampled trajectory.
(The release trains them like sampled tokens, §7.8c; :func:`loss_mask` builds our mask.)

Masked positions contribute nothing to the value or the gradient, even if ``logp`` there is
non-finite (padding logits are sometimes garbage): inputs are zeroed with ``torch.where`` before use.
"""

from __future__ import annotations

import torch

from npr_pipelines.rl.registry import get_loss_agg, register_loss_agg, register_policy_loss

DAPO_CLIP_LOW = 0.2
DAPO_CLIP_HIGH = 0.28
DUAL_CLIP_C = 10.0
LOG_RATIO_CLAMP = 20.0


def loss_mask(response_mask: torch.Tensor, inserted: torch.Tensor | None = None) -> torch.Tensor:
    """Trainable-token mask: response tokens the policy sampled.

    Args:
        response_mask: ``[B, T]``, response tokens up to and including the first EOS (no prompt, no pad).
        inserted: ``[B, T]`` bool or ``None``, tokens the rollout engine forced into the sequence.

    Returns:
        ``[B, T]`` bool.
    """
    mask = response_mask.bool()
    if inserted is not None:
        if inserted.shape != mask.shape:
            raise ValueError(f"inserted {tuple(inserted.shape)} must match response_mask {tuple(mask.shape)}")
        mask = mask & ~inserted.bool()
    return mask


def _check_2d(mask: torch.Tensor, **tensors: torch.Tensor | None) -> torch.Tensor:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match mask {tuple(mask.shape)}")
    return mask.bool()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, T]`` over ``mask``; 0 when the mask is empty."""
    m = mask.bool()
    return torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1)


@register_loss_agg("token-mean")
def token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor, *, denominator: float | None = None
) -> torch.Tensor:
    """Sum of the masked per-token losses / number of masked tokens (DAPO's token-level loss).

    Every token in the batch weighs the same, so long responses weigh more than short ones.
    ``denominator`` replaces the local token count with the token count of the whole mini-batch:
    then summing this over the micro-batches (gradient accumulation, data-parallel ranks summing
    gradients) gives exactly the mini-batch token-mean, however the mini-batch was split. ``None``
    = this tensor is the whole batch.

    Args:
        loss_mat: ``[B, T]`` per-token losses.
        mask: ``[B, T]``.
        denominator: tokens in the full batch, or ``None``.

    Returns:
        scalar; 0 (with zero gradient) for an empty mask.
    """
    m = _check_2d(mask, loss_mat=loss_mat)
    total = torch.where(m, loss_mat, 0.0).sum()
    return total / (m.sum().clamp(min=1) if denominator is None else denominator)


def _seq_mean(per_seq: torch.Tensor, has_tokens: torch.Tensor, denominator: float | None) -> torch.Tensor:
    total = torch.where(has_tokens, per_seq, 0.0).sum()
    return total / (has_tokens.sum().clamp(min=1) if denominator is None else denominator)


@register_loss_agg("seq-mean-token-sum")
def seq_mean_token_sum(
    loss_mat: torch.Tensor, mask: torch.Tensor, *, denominator: float | None = None
) -> torch.Tensor:
    """Mean over sequences of each sequence's summed token losses.

    Sequences with no masked token are left out of the mean. ``denominator`` = sequences in the full
    batch (see :func:`token_mean` for why).

    Args:
        loss_mat: ``[B, T]``.
        mask: ``[B, T]``.
        denominator: sequences in the full batch, or ``None``.

    Returns:
        scalar.
    """
    m = _check_2d(mask, loss_mat=loss_mat)
    per_seq = torch.where(m, loss_mat, 0.0).sum(dim=-1)
    return _seq_mean(per_seq, m.any(dim=-1), denominator)


@register_loss_agg("seq-mean-token-mean")
def seq_mean_token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor, *, denominator: float | None = None
) -> torch.Tensor:
    """Mean over sequences of each sequence's mean token loss (every sequence weighs the same).

    This is what the PAPO release effectively optimises per optimiser step (§4.6: token-mean over
    1-sequence micro-batches, averaged by gradient accumulation and data parallelism). Sequences with
    no masked token are left out. ``denominator`` = sequences in the full batch.

    Args:
        loss_mat: ``[B, T]``.
        mask: ``[B, T]``.
        denominator: sequences in the full batch, or ``None``.

    Returns:
        scalar.
    """
    m = _check_2d(mask, loss_mat=loss_mat)
    per_seq = torch.where(m, loss_mat, 0.0).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)
    return _seq_mean(per_seq, m.any(dim=-1), denominator)


def _metrics(**values: torch.Tensor | float) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).detach().float() for k, v in values.items()}


@register_policy_loss("dapo")
def dapo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    agg_mode: str = "token-mean",
    denominator: float | None = None,
    clip_low: float = DAPO_CLIP_LOW,
    clip_high: float = DAPO_CLIP_HIGH,
    clip_c: float = DUAL_CLIP_C,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with clip-higher and dual clip (DAPO, arXiv 2503.14476; stage 1).

    With ``rho = exp(clamp(logp - old_logp, ±log_ratio_clamp))`` and advantage ``A`` per token::

        l = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))
        l = min(l, -A clip_c)   where A < 0   (dual clip: caps the loss of a negative-advantage
                                               token at clip_c |A| however large rho grows)

    then aggregated by ``agg_mode``. Clipped tokens have zero gradient. Defaults are stage 1's:
    0.2 / 0.28 / c = 10, log-ratio clamp 20, token-mean.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``[B, T]`` log-probs under the rollout policy (no grad). Required.
        advantages: ``[B, T]``.
        mask: ``[B, T]`` trainable tokens (see the module docstring).
        agg_mode: a registered loss aggregation mode.
        denominator: passed to the aggregation (full-batch token or sequence count).
        clip_low, clip_high: the ratio clip range ``[1 - clip_low, 1 + clip_high]``.
        clip_c: dual-clip constant, > 1.

    Returns:
        ``(loss, metrics)``; metrics are 0-d tensors over masked tokens: ``clip_frac`` (the ratio
        clip is active), ``dual_clip_frac`` (the dual clip is active), ``approx_kl`` (mean of
        ``old_logp - logp``, the k1 estimate of KL(old || new)), ``ratio_mean``.
    """
    if old_logp is None:
        raise ValueError("the dapo loss needs old_logp (log-probs under the rollout policy)")
    if clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1, got {clip_c}")
    m = _check_2d(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    logp = torch.where(m, logp, 0.0)
    old_logp = torch.where(m, old_logp.detach(), 0.0)
    adv = torch.where(m, advantages.detach(), 0.0)

    log_ratio = (logp - old_logp).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_clip = torch.maximum(unclipped, clipped)
    dual_cap = -adv * clip_c
    negative = adv < 0
    per_token = torch.where(negative, torch.minimum(loss_clip, dual_cap), loss_clip)

    loss = get_loss_agg(agg_mode)(per_token, m, denominator=denominator)
    metrics = _metrics(
        clip_frac=masked_mean((clipped > unclipped).float(), m),
        dual_clip_frac=masked_mean((negative & (loss_clip > dual_cap)).float(), m),
        approx_kl=masked_mean(-log_ratio.detach(), m),
        ratio_mean=masked_mean(ratio.detach(), m),
    )
    return loss, metrics


@register_policy_loss("papo")
def papo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    agg_mode: str = "token-mean",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PAPO's strict on-policy loss: no importance ratio, no clip, no KL, no entropy (§4.6).

    ``rho = exp(logp - sg(logp))`` is 1 in value with gradient ``grad logp``, so::

        loss = -agg(A * rho)        grad = -agg(A * grad logp)   (REINFORCE with PAPO advantages)

    With ``token-mean`` the gradient on a masked-in token is ``-A grad logp / N``, ``N`` = masked
    tokens (or ``denominator``). Nothing clips, so the gradient on the parallel-control special
    tokens is never suppressed, which is the stated motivation (§4.1).

    ``old_logp`` does not enter the loss. When given, ``approx_kl`` reports ``mean(old_logp - logp)``:
    how far the policy has moved since the rollout, which is nonzero for every mini-batch after the
    first of an RL step (the release takes ~16 optimiser steps per rollout batch, §7.7).

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``[B, T]`` or ``None``; only for the drift metric.
        advantages: ``[B, T]``.
        mask: ``[B, T]`` trainable tokens (see the module docstring).
        agg_mode: a registered loss aggregation mode.
        denominator: passed to the aggregation.

    Returns:
        ``(loss, metrics)`` with the same metric keys as :func:`dapo_policy_loss` (clip fractions 0,
        ``ratio_mean`` 1).
    """
    m = _check_2d(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    logp = torch.where(m, logp, 0.0)
    adv = torch.where(m, advantages.detach(), 0.0)
    ratio = (logp - logp.detach()).exp()
    loss = get_loss_agg(agg_mode)(-adv * ratio, m, denominator=denominator)
    kl = 0.0 if old_logp is None else masked_mean(torch.where(m, old_logp.detach(), 0.0) - logp.detach(), m)
    metrics = _metrics(
        clip_frac=0.0, dual_clip_frac=0.0, approx_kl=kl, ratio_mean=masked_mean(ratio.detach(), m)
    )
    return loss, metrics
