"""Training losses: PPO clipped surrogate and clipped value loss, A2C, the GRPO KL term, reward-model
(Bradley-Terry / InstructGPT ranking) losses, and the SFT cross-entropy.

Owns every objective the learner and critic minimize. Per-token losses are reduced with
``masks.aggregate_loss``; metrics are returned detached, as ``(loss, {name: scalar})``, for the
caller to namespace (``policy/``, ``critic/``, ``reward/``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .kl import kl_estimate
from .logprobs import logprobs_from_logits
from .masks import aggregate_loss, check_same_shape, masked_mean


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg_mode: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))``.

    Schulman et al. 2017 eq. 7, written as in CleanRL ``ppo.py`` (``pg_loss1``/``pg_loss2``).
    ``clip_eps_high`` (default ``clip_eps``) allows the asymmetric "clip-higher" range of DAPO
    (Yu et al. 2025). Metrics (CleanRL): ``clipfrac`` = fraction of valid tokens whose ratio lies
    outside ``[1 - eps, 1 + eps_high]``; ``approx_kl`` = mean of ``(ratio - 1) - log ratio``
    (Schulman's k3 estimate of KL(old || new)).

    Args:
        logprobs: ``(b, a)`` current policy logprobs (with grad).
        old_logprobs: ``(b, a)`` logprobs of the policy that sampled (detached).
        advantages: ``(b, a)`` (detached).
        mask: ``(b, a)`` response mask.
        agg_mode: one of ``masks.AGG_MODES``.

    Returns:
        ``(loss (), {"clipfrac": (), "approx_kl": ()})``.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    keep = mask.bool()
    # Zero the log-ratio in padding before exp: an inf there would poison the backward pass.
    log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), keep, agg_mode)
    with torch.no_grad():
        outside = (ratio < 1 - clip_eps) | (ratio > 1 + eps_high)
        metrics = {
            "clipfrac": masked_mean(outside.float(), keep),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, keep),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    agg_mode: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss ``0.5 * max((V - R)^2, (V_clipped - R)^2)``, ``V_clipped = V_old + clip(V - V_old, +-eps)``.

    CleanRL ``ppo.py`` (``clip_vloss``), OpenRLHF ``ValueLoss``, torchtune ``loss/ppo.py``.
    ``clip_eps=None`` gives the plain ``0.5 * (V - R)^2``. Metric ``clipfrac`` = fraction of valid
    tokens where ``|V - V_old| > eps`` (0 when unclipped).

    Args:
        values: ``(b, a)`` current critic values (with grad).
        old_values: ``(b, a)`` values at rollout time (detached).
        returns: ``(b, a)`` targets, e.g. from ``advantages.gae`` (detached).
        mask: ``(b, a)`` response mask.
        agg_mode: one of ``masks.AGG_MODES``.

    Returns:
        ``(loss (), {"clipfrac": ()})``.
    """
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    keep = mask.bool()
    per_token = (values - returns).pow(2)
    if clip_eps is None:
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        per_token = torch.maximum(per_token, (values_clipped - returns).pow(2))
        with torch.no_grad():
            clipfrac = masked_mean(((values - old_values).abs() > clip_eps).float(), keep)
    return 0.5 * aggregate_loss(per_token, keep, agg_mode), {"clipfrac": clipfrac}


def a2c_policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg_mode: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Vanilla policy-gradient / advantage actor-critic loss ``-A * log pi`` (Mnih et al. 2016, A3C
    eq. for the actor gradient; Williams 1992 REINFORCE). On-policy only: no importance ratio.

    Args:
        logprobs: ``(b, a)`` current policy logprobs (with grad).
        advantages: ``(b, a)`` (detached).
        mask: ``(b, a)`` response mask.
        agg_mode: one of ``masks.AGG_MODES``.

    Returns:
        ``(loss (), {})``: no extra metrics.
    """
    check_same_shape(logprobs=logprobs, advantages=advantages, mask=mask)
    return aggregate_loss(-advantages * logprobs, mask, agg_mode), {}


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    agg_mode: str = "token_mean",
) -> torch.Tensor:
    """KL(pi || ref) as a loss term, as in GRPO (Shao et al. 2024 eq. 3-4, k3 estimator by default).

    Args:
        logprobs: ``(b, a)`` current policy logprobs (with grad).
        ref_logprobs: ``(b, a)`` reference logprobs (detached).
        mask: ``(b, a)`` response mask.
        kind: one of ``kl.KL_ESTIMATORS``.
        agg_mode: one of ``masks.AGG_MODES``.

    Returns:
        ``()``.
    """
    return aggregate_loss(kl_estimate(logprobs, ref_logprobs, kind), mask, agg_mode)


def pairwise_bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss ``mean(-log sigmoid(r_chosen - r_rejected - margin))``.

    Ouyang et al. 2022 (InstructGPT) eq. 1 for one pair; the margin as in Llama 2 (Touvron et al.
    2023, eq. 2); OpenRLHF ``PairWiseLoss``. ``logsigmoid`` is the stable form of ``log(sigmoid)``.

    Args:
        chosen: ``(n,)`` rewards of the preferred completions.
        rejected: ``(n,)`` rewards of the dispreferred completions.

    Returns:
        ``()``.
    """
    check_same_shape(chosen=chosen, rejected=rejected)
    return -F.logsigmoid(chosen - rejected - margin).mean()


def ranking_pairs(k: int) -> list[tuple[int, int]]:
    """All ``(better, worse)`` index pairs ``i < j`` of ``k`` completions ranked best to worst.

    ``C(k, 2)`` pairs, in lexicographic order: ``k=3 -> [(0, 1), (0, 2), (1, 2)]``.
    """
    return list(itertools.combinations(range(k), 2))


def ranking_loss(rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InstructGPT reward-model loss over a ranking of ``k`` completions (Ouyang et al. 2022, eq. 1):
    ``-1 / C(k, 2) * E[sum_{pairs} log sigmoid(r_better - r_worse)]``.

    Every row contributes all ``C(k, 2)`` pairs as one batch element, so the mean over all pairs
    equals the mean over rows of the per-row pair mean. Metric ``accuracy`` = fraction of pairs
    with ``r_better > r_worse``.

    Args:
        rewards: ``(b, k)``, each row's completions ordered best to worst, ``k >= 2``.

    Returns:
        ``(loss (), {"accuracy": ()})``.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (b, k) with k >= 2, got shape {tuple(rewards.shape)}")
    better_idx, worse_idx = zip(*ranking_pairs(rewards.shape[1]), strict=True)
    better = rewards[:, list(better_idx)]  # (b, C(k, 2))
    worse = rewards[:, list(worse_idx)]
    loss = pairwise_bt_loss(better.reshape(-1), worse.reshape(-1))
    with torch.no_grad():
        accuracy = (better > worse).float().mean()
    return loss, {"accuracy": accuracy}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning loss: mean negative log-likelihood over the masked (response) tokens.

    Token-mean cross-entropy, as ``torch.nn.CrossEntropyLoss`` with ``ignore_index`` (torchtune
    ``CEWithChunkedOutputLoss``, OpenRLHF ``GPTLMLoss``), computed through
    ``logprobs.logprobs_from_logits`` so SFT and RL see the same log-probabilities.

    Args:
        logits: ``(b, t, v)``.
        labels: ``(b, t)`` target ids already aligned to ``logits`` (shifted by the caller);
            masked positions may hold any value, e.g. ``-100``.
        loss_mask: ``(b, t)`` 1 where the loss applies.

    Returns:
        ``()``; 0 if no token is selected.
    """
    check_same_shape(labels=labels, loss_mask=loss_mask)
    keep = loss_mask.bool()
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
    return masked_mean(-logprobs_from_logits(logits, safe_labels), keep)
