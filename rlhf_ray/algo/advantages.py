"""Advantage estimators: GAE (PPO), reward-to-go, and the critic-free group / batch baselines
(GRPO, RLOO, REINFORCE++).

Owns the step "rewards (+ values) -> advantages (+ returns)". Token-level estimators take right-
padded ``(b, a)`` tensors whose mask is ``1..1 0..0`` per row; the episode ends after the last
valid token, so the value there is 0. Sequence-level estimators take ``(b,)`` scores whose rows are
grouped contiguously: rows ``[g*n, (g+1)*n)`` are the ``n`` samples of prompt ``g``.
"""

from __future__ import annotations

import torch

from .masks import check_same_shape, masked_whiten


def _reverse_discounted_cumsum(x: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """``y_t = x_t + discount * y_{t+1}`` along the last dim, with ``y = 0`` past the last valid token.

    The single backward recursion behind both GAE (``x = delta``, ``discount = gamma * lam``) and
    reward-to-go (``x = r``, ``discount = gamma``). Masked entries of ``x`` are zeroed first, so with
    right padding nothing from the padding flows back into valid positions.

    Args:
        x: ``(b, a)``.
        mask: ``(b, a)`` 0/1 or bool, right-padded.

    Returns:
        ``(b, a)``; 0 at masked positions.
    """
    keep = mask.bool()
    x = torch.where(keep, x, torch.zeros_like(x))
    out = torch.zeros_like(x)
    running = torch.zeros_like(x[..., 0])
    for t in reversed(range(x.shape[-1])):
        running = x[..., t] + discount * running
        out[..., t] = running
    return torch.where(keep, out, torch.zeros_like(out))


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) and the critic's targets.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V = 0`` after the last valid token;
    ``A_t = sum_l (gamma * lam)^l delta_{t+l}``; ``returns = A + V``. As CleanRL ``ppo.py``,
    torchtune ``rlhf/rewards.py::estimate_advantages`` and OpenRLHF
    ``get_advantages_and_returns``. Advantages are not whitened here (see ``masks.masked_whiten``).

    Args:
        token_rewards: ``(b, a)`` per-token rewards (e.g. ``kl.kl_penalized_rewards``).
        values: ``(b, a)`` critic values ``V(s_t)`` of the old critic (detached).
        mask: ``(b, a)`` response mask, right-padded.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, each ``(b, a)``, 0 at masked positions.
    """
    check_same_shape(token_rewards=token_rewards, values=values, mask=mask)
    keep = mask.bool()
    values = torch.where(keep, values, torch.zeros_like(values))
    # Shift left by one: V_{t+1}, zero after the row end (right padding makes that the padding).
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = token_rewards + gamma * next_values - values
    advantages = _reverse_discounted_cumsum(deltas, keep, gamma * lam)
    returns = torch.where(keep, advantages + values, torch.zeros_like(values))
    return advantages, returns


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{l>=0} gamma^l r_{t+l}`` (Sutton & Barto eq. 3.8; REINFORCE).

    Args:
        token_rewards: ``(b, a)``.
        mask: ``(b, a)`` response mask, right-padded.
        gamma: discount factor.

    Returns:
        ``(b, a)``; 0 at masked positions.
    """
    check_same_shape(token_rewards=token_rewards, mask=mask)
    return _reverse_discounted_cumsum(token_rewards, mask, gamma)


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reshape ``(b,)`` scores to ``(b // n, n)`` groups, validating the shapes."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (b,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"a group baseline needs group_size >= 2 samples per prompt, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"batch size {scores.shape[0]} is not a multiple of group_size {group_size}")
    return scores.view(-1, group_size)


def _grouped_valid(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None) -> torch.Tensor:
    """``(b // n, n)`` bool: which samples count (all, when ``valid`` is None)."""
    if valid is None:
        return torch.ones(scores.shape[0] // group_size, group_size, dtype=torch.bool, device=scores.device)
    if valid.shape != scores.shape:
        raise ValueError(f"valid must be (b,) = {tuple(scores.shape)}, got {tuple(valid.shape)}")
    return valid.bool().view(-1, group_size)


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO outcome advantage: ``(r_i - mean(group)) / (std(group) + eps)``.

    Shao et al. 2024 (DeepSeekMath) section 4.1.2, with the unbiased std as in TRL ``GRPOTrainer``
    and OpenRLHF ``group_norm``. ``normalize_std=False`` keeps only the mean baseline (Dr. GRPO,
    Liu et al. 2025, section 3.1: the std division up-weights prompts that are too easy or too
    hard). Requires ``group_size >= 2``.

    Masked samples (``valid == 0``, e.g. a non-finite reward) are left out of their group's mean
    and std and get advantage 0: group ``[1, 2, masked, 3]`` gives ``[-1, 0, 0, 1]``. A group with
    fewer than two valid samples has no baseline: all its advantages are 0.

    Args:
        scores: ``(b,)`` sequence rewards, grouped contiguously by prompt.
        group_size: samples per prompt ``n``; ``b % n`` must be 0.
        valid: ``(b,)`` 0/1 or bool; None = all valid.

    Returns:
        ``(b,)``.
    """
    groups = _grouped(scores, group_size)
    keep = _grouped_valid(scores, group_size, valid)
    count = keep.sum(dim=-1, keepdim=True).to(groups.dtype)
    x = torch.where(keep, groups, torch.zeros_like(groups))
    mean = x.sum(dim=-1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(keep, groups - mean, torch.zeros_like(groups))
    if normalize_std:
        var = centered.pow(2).sum(dim=-1, keepdim=True) / (count - 1).clamp(min=1)
        centered = centered / (var.sqrt() + eps)
    return torch.where(count >= 2, centered, torch.zeros_like(centered)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO advantage: ``r_i - mean_{j != i} r_j`` over the other samples of the same prompt.

    Ahmadian et al. 2024 eq. 5 (Kool et al. 2019's leave-one-out baseline), computed as
    ``r_i - (sum(group) - r_i) / (n - 1)``, as OpenRLHF's ``rloo`` estimator. Masked samples
    (``valid == 0``) are neither baselines nor baselined (advantage 0); ``n`` counts the valid
    samples of the group, and a group with fewer than two has advantage 0.

    Args:
        scores: ``(b,)`` sequence rewards, grouped contiguously by prompt.
        group_size: samples per prompt ``n >= 2``; ``b % n`` must be 0.
        valid: ``(b,)`` 0/1 or bool; None = all valid.

    Returns:
        ``(b,)``.
    """
    groups = _grouped(scores, group_size)
    keep = _grouped_valid(scores, group_size, valid)
    count = keep.sum(dim=-1, keepdim=True).to(groups.dtype)
    x = torch.where(keep, groups, torch.zeros_like(groups))
    baseline = (x.sum(dim=-1, keepdim=True) - x) / (count - 1).clamp(min=1)
    adv = torch.where(keep & (count >= 2), groups - baseline, torch.zeros_like(groups))
    return adv.reshape(-1)


def groups_with_signal(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None,
                       tol: float = 0.0) -> torch.Tensor:
    """DAPO dynamic sampling: which groups to keep, i.e. those whose valid rewards do NOT all agree.

    Yu et al. 2025 (DAPO), section 3.2, eq. 11 (``0 < |{o_i : is_equivalent(a, o_i)}| < G``): a
    group whose samples all got the same reward has zero group-relative advantage, so it only
    dilutes the batch. Groups with fewer than two valid samples carry no signal either.

    Args:
        scores: ``(b,)`` sequence rewards, grouped contiguously by prompt.
        group_size: samples per prompt ``n >= 2``.
        valid: ``(b,)`` 0/1 or bool; None = all valid.
        tol: rewards within ``tol`` of each other count as equal.

    Returns:
        ``(b // n,)`` bool: True = keep the group.
    """
    groups = _grouped(scores, group_size)
    keep = _grouped_valid(scores, group_size, valid)
    hi = torch.where(keep, groups, torch.full_like(groups, -torch.inf)).amax(dim=-1)
    lo = torch.where(keep, groups, torch.full_like(groups, torch.inf)).amin(dim=-1)
    return (keep.sum(dim=-1) >= 2) & (hi - lo > tol)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++ advantage: reward-to-go, whitened over all valid tokens of the batch.

    Hu 2025 (REINFORCE++, eq. for ``A_t = r(x, y) - beta * sum_{i>=t} KL(i)``, then global batch
    normalization); OpenRLHF ``reinforce`` estimator (``get_cumulative_returns`` + whitening).
    ``token_rewards`` are normally ``kl.kl_penalized_rewards``.

    Args:
        token_rewards: ``(b, a)``.
        mask: ``(b, a)`` response mask, right-padded.
        gamma: discount factor.

    Returns:
        ``(b, a)``; 0 at masked positions.
    """
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask)


def broadcast_sequence_advantages(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each row's sequence advantage on every valid token (GRPO/RLOO outcome supervision,
    Shao et al. 2024 section 4.1.2: ``A_{i,t} = A_i`` for all ``t``).

    Args:
        adv: ``(b,)`` sequence advantages.
        mask: ``(b, a)`` response mask.

    Returns:
        ``(b, a)``; 0 at masked positions.
    """
    if adv.shape != mask.shape[:1]:
        raise ValueError(f"adv must be (b,) = {tuple(mask.shape[:1])}, got {tuple(adv.shape)}")
    return torch.where(mask.bool(), adv.unsqueeze(-1), 0.0)
