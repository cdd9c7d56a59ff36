"""Training losses: the policy losses (PPO/DAPO clipped surrogate, GSPO, CISPO, A2C), the clipped
value loss, the KL-to-reference loss term, reward-model (Bradley-Terry / InstructGPT ranking)
losses, and the SFT cross-entropy.

Owns every objective the learner and critic minimize. Per-token losses are reduced with
``masks.aggregate_loss`` (optionally with the full minibatch's ``LossNormalizer``, so that
micro-batches add up to the minibatch loss); metrics are returned detached, as ``(loss, {name: scalar})``, for the
caller to namespace (``policy/``, ``critic/``, ``reward/``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .kl import K3_LOG_RATIO_CLAMP, kl_estimate
from .logprobs import logprobs_from_logits
from .masks import LossNormalizer, aggregate_loss, check_same_shape, masked_mean


def _weighted(per_token: torch.Tensor, is_weights: torch.Tensor | None) -> torch.Tensor:
    """Multiply a per-token loss by detached importance weights (off-policy correction)."""
    return per_token if is_weights is None else per_token * is_weights.detach()


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg_mode: str = "token_mean",
    norm: LossNormalizer | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))``.

    Schulman et al. 2017 eq. 7, written as in CleanRL ``ppo.py`` (``pg_loss1``/``pg_loss2``).
    ``clip_eps_high`` (default ``clip_eps``) allows the asymmetric "clip-higher" range of DAPO
    (Yu et al. 2025, section 3.1, eq. 10). Metrics (CleanRL): ``clipfrac`` = fraction of valid
    tokens whose ratio lies outside ``[1 - eps, 1 + eps_high]``; ``approx_kl`` = mean of
    ``(ratio - 1) - log ratio`` (Schulman's k3 estimate of KL(old || new)).

    Args:
        logprobs: ``(b, a)`` current policy logprobs (with grad).
        old_logprobs: ``(b, a)`` logprobs of the policy that sampled (detached).
        advantages: ``(b, a)`` (detached).
        mask: ``(b, a)`` response mask.
        agg_mode: one of ``masks.AGG_MODES``.
        norm: the full minibatch's counts (``masks.LossNormalizer``); None = this batch.
        is_weights: ``(b, a)`` detached off-policy weights (``off_policy.importance_weights``).

    Returns:
        ``(loss (), {"clipfrac": (), "approx_kl": ()})``; with ``norm``, this batch's shares.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    keep = mask.bool()
    # Zero the log-ratio in padding before exp: an inf there would poison the backward pass.
    log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    per_token = _weighted(torch.maximum(unclipped, clipped), is_weights)
    loss = aggregate_loss(per_token, keep, agg_mode, norm)
    with torch.no_grad():
        outside = (ratio < 1 - clip_eps) | (ratio > 1 + eps_high)
        metrics = {
            "clipfrac": aggregate_loss(outside.float(), keep, "token_mean", norm),
            "approx_kl": aggregate_loss((ratio - 1) - log_ratio, keep, "token_mean", norm),
        }
    return loss, metrics


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    agg_mode: str = "seq_mean_token_mean",
    norm: LossNormalizer | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: PPO clipping on the *sequence* ratio ``s_i = exp(mean_t log(pi / pi_old))``.

    Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7, in its token form
    GSPO-token (eq. 13): ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, whose value is ``s_i``
    on every token of row ``i`` and whose gradient is ``s_i * grad log pi(y_t)``, so the loss
    ``max(-A s_{i,t}, -A clip(s_{i,t}, 1 - eps, 1 + eps_high))`` aggregated by
    ``seq_mean_token_mean`` equals the sequence objective (as veRL ``compute_policy_loss_gspo``).
    The paper's clip range is tiny (3e-4 / 4e-4) because ``s_i`` is a geometric mean.
    The log of ``s_i`` is clamped at 10 (veRL) so a broken row cannot overflow.

    Args/Returns: as :func:`ppo_policy_loss`; ``clipfrac`` counts tokens of clipped rows.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    keep = mask.bool()
    log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    seq_log_ratio = masked_mean(log_ratio, keep, dim=-1)  # (b,)
    log_s = (logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)).clamp(max=10.0)
    s = torch.exp(torch.where(keep, log_s, torch.zeros_like(log_s)))
    per_token = torch.maximum(-advantages * s, -advantages * torch.clamp(s, 1 - clip_eps, 1 + eps_high))
    loss = aggregate_loss(_weighted(per_token, is_weights), keep, agg_mode, norm)
    with torch.no_grad():
        outside = (s < 1 - clip_eps) | (s > 1 + eps_high)
        metrics = {
            "clipfrac": aggregate_loss(outside.float(), keep, "token_mean", norm),
            "approx_kl": aggregate_loss(torch.exp(log_ratio) - 1 - log_ratio, keep, "token_mean", norm),
        }
    return loss, metrics


def cispo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 1.0,
    clip_eps_high: float | None = 0.28,
    agg_mode: str = "token_mean",
    norm: LossNormalizer | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: ``-sg(clip(ratio, 1 - eps, 1 + eps_high)) * A * log pi``.

    MiniMax-M1 (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    Attention", section 3.1, eq. 4-5): the importance weight is clipped and *detached*, so unlike
    PPO no token's gradient is dropped, only its weight bounded. The paper sets no lower bound
    (``clip_eps = 1`` gives ``1 - eps = 0``) and tunes ``eps_high``; token-level mean.

    Args/Returns: as :func:`ppo_policy_loss`; ``clipfrac`` = tokens whose weight was clipped.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    keep = mask.bool()
    log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs)).detach()
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    safe_logprobs = torch.where(keep, logprobs, torch.zeros_like(logprobs))
    per_token = -weight * advantages * safe_logprobs
    loss = aggregate_loss(_weighted(per_token, is_weights), keep, agg_mode, norm)
    with torch.no_grad():
        outside = (ratio < 1 - clip_eps) | (ratio > 1 + eps_high)
        metrics = {
            "clipfrac": aggregate_loss(outside.float(), keep, "token_mean", norm),
            "approx_kl": aggregate_loss((ratio - 1) - log_ratio, keep, "token_mean", norm),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    agg_mode: str = "token_mean",
    norm: LossNormalizer | None = None,
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
        norm: the full minibatch's counts (``masks.LossNormalizer``); None = this batch.

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
            clipfrac = aggregate_loss(((values - old_values).abs() > clip_eps).float(), keep, "token_mean", norm)
    return 0.5 * aggregate_loss(per_token, keep, agg_mode, norm), {"clipfrac": clipfrac}


def a2c_policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg_mode: str = "token_mean",
    norm: LossNormalizer | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Vanilla policy-gradient / advantage actor-critic loss ``-A * log pi`` (Mnih et al. 2016, A3C
    eq. for the actor gradient; Williams 1992 REINFORCE). On-policy only: no importance ratio,
    so the algorithm table runs it for one epoch of one minibatch.

    Args:
        logprobs: ``(b, a)`` current policy logprobs (with grad).
        advantages: ``(b, a)`` (detached).
        mask: ``(b, a)`` response mask.
        agg_mode: one of ``masks.AGG_MODES``.
        norm: the full minibatch's counts (``masks.LossNormalizer``); None = this batch.
        is_weights: ``(b, a)`` detached off-policy weights.

    Returns:
        ``(loss (), {})``: no extra metrics.
    """
    check_same_shape(logprobs=logprobs, advantages=advantages, mask=mask)
    keep = mask.bool()
    safe_logprobs = torch.where(keep, logprobs, torch.zeros_like(logprobs))
    return aggregate_loss(_weighted(-advantages * safe_logprobs, is_weights), keep, agg_mode, norm), {}


KL_LOSS_ESTIMATORS = ("k2", "k3")


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k2",
    agg_mode: str = "token_mean",
    old_logprobs: torch.Tensor | None = None,
    norm: LossNormalizer | None = None,
) -> torch.Tensor:
    """KL to the reference as a loss term (GRPO, Shao et al. 2024 eq. 3-4), for its GRADIENT.

    A loss term is only as good as its gradient at tokens sampled from ``pi_old``
    (``E_old[sg(pi / pi_old) * grad k]``, the weight ``pi / pi_old`` being 1 on the first pass):
        - ``k2 = 0.5 (log pi - log ref)^2``: gradient ``(log pi - log ref) grad log pi``, whose
          expectation is exactly ``grad KL(pi || ref)``.
        - ``k3 = ref/pi - 1 - log(ref/pi)``: gradient ``(1 - ref/pi) grad log pi``, expectation
          ``-sum_y ref(y) grad log pi(y) = grad KL(ref || pi)``: the *reverse* KL (what GRPO
          minimises in practice; mass-covering toward the reference).
        - ``k1 = log pi - log ref`` is rejected: its gradient is ``grad log pi``, zero in
          expectation, so it never pulls toward the reference (its *value* is fine as a reward
          penalty, ``kl.kl_penalized_rewards``).
    See J. Schulman, "Approximating KL Divergence" (2020), and Tang & Munos 2025, "On a few
    pitfalls in KL divergence gradient estimation for RL". On reused samples (later epochs or
    minibatches) pass ``old_logprobs``: the detached ratio ``pi / pi_old`` makes the expectation
    the same as on-policy.

    Args:
        logprobs: ``(b, a)`` current policy logprobs (with grad).
        ref_logprobs: ``(b, a)`` reference logprobs (detached).
        mask: ``(b, a)`` response mask.
        kind: one of ``KL_LOSS_ESTIMATORS``.
        agg_mode: one of ``masks.AGG_MODES``.
        old_logprobs: ``(b, a)`` logprobs of the sampling policy; None = on-policy (weight 1).
        norm: the full minibatch's counts (``masks.LossNormalizer``); None = this batch.

    Returns:
        ``()``.
    """
    if kind not in KL_LOSS_ESTIMATORS:
        raise ValueError(
            f"KL estimator {kind!r} cannot be a loss term: its gradient is not that of a KL "
            f"(k1's is grad log pi, zero in expectation); use one of {KL_LOSS_ESTIMATORS}"
        )
    keep = mask.bool()
    per_token = kl_estimate(logprobs, ref_logprobs, kind)
    if old_logprobs is not None:
        log_w = torch.where(keep, logprobs.detach() - old_logprobs, torch.zeros_like(logprobs))
        per_token = per_token * torch.exp(log_w.clamp(max=K3_LOG_RATIO_CLAMP))
    return aggregate_loss(per_token, keep, agg_mode, norm)


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
