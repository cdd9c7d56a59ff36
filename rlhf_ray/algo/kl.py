"""KL divergence between the policy and the frozen reference: estimators, coefficient controllers,
and the KL-penalized per-token reward of RLHF.

Owns the KL term in both of its uses: as a reward penalty (PPO, REINFORCE++: Ziegler et al. 2019,
InstructGPT) through :func:`kl_penalized_rewards`, and as a loss term (GRPO) through
``losses.kl_loss``; both go through :func:`kl_estimate`.
"""

from __future__ import annotations

import torch

from .masks import check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")

# exp(20) ~ 4.9e8 is finite in fp16/bf16/fp32; a token whose log-ratio exceeds this is
# already a broken sample, and an inf here would turn the whole loss into NaN.
K3_LOG_RATIO_CLAMP = 20.0


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token sample estimate of ``KL(pi || ref)`` from tokens sampled from ``pi``.

    J. Schulman, "Approximating KL Divergence" (2020), with ``log r = ref_logprobs - logprobs``:
        - ``k1 = -log r = logprobs - ref_logprobs``: unbiased, high variance, can be negative.
        - ``k2 = 0.5 * (log r)^2``: biased, low variance, always >= 0.
        - ``k3 = (r - 1) - log r``: unbiased, low variance, always >= 0 (used by GRPO,
          Shao et al. 2024 eq. 4). ``log r`` is clamped to ``[-20, 20]`` before ``exp`` to avoid
          overflow (OpenRLHF ``compute_approx_kl`` clamps the same way).
    These are estimates of the KL's *value*. Differentiated as a loss term they estimate other
    gradients (k1: zero, k3: that of KL(ref || pi)); see ``losses.kl_loss``.

    Args:
        logprobs: ``(b, a)`` log pi(token).
        ref_logprobs: ``(b, a)`` log ref(token).
        kind: one of ``KL_ESTIMATORS``.

    Returns:
        ``(b, a)`` per-token estimates (not masked; reduce with ``masks.masked_mean``).
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        log_r = (-log_ratio).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


class FixedKLController:
    """Constant KL coefficient (Ziegler et al. 2019, the non-adaptive baseline)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""

    def state_dict(self) -> dict[str, float]:
        """The checkpointable state: ``{"value": coef}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered toward a target KL (Ziegler et al. 2019, section 2.2, eq. 2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    Same as lm-human-preferences ``AdaptiveKLController`` and OpenRLHF ``AdaptiveKLController``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=}, {horizon=}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update ``value`` after ``n_steps`` samples (the batch size) whose mean KL was ``current_kl``."""
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The checkpointable state: ``{"value": coef}`` (target and horizon come from config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`."""
        self.value = float(state["value"])


def last_token_onehot(mask: torch.Tensor) -> torch.Tensor:
    """One-hot of the last valid position of each row; an all-masked row is all zeros.

    Same index as OpenRLHF ``compute_reward``: ``a - 1 - fliplr(mask).argmax(-1)``.

    Args:
        mask: ``(b, a)`` 0/1 or bool.

    Returns:
        ``(b, a)`` bool.
    """
    keep = mask.bool()
    a = keep.shape[-1]
    last = a - 1 - keep.flip(-1).long().argmax(dim=-1)
    onehot = torch.nn.functional.one_hot(last, num_classes=a).bool()
    return onehot & keep.any(dim=-1, keepdim=True)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> torch.Tensor:
    """Per-token RLHF reward: ``-kl_coef * KL_t`` on every valid token, plus the sequence score on
    the last valid token.

    Ziegler et al. 2019 eq. 2, ``R(x, y) = r(x, y) - beta * log(pi(y|x) / ref(y|x))``, spread over
    tokens as in lm-human-preferences, InstructGPT (Ouyang et al. 2022, eq. 2), torchtune
    ``rlhf/rewards.py::get_rewards_ppo`` and OpenRLHF ``compute_reward``. A row with no valid
    token receives nothing (its score has no token to sit on).

    Args:
        scores: ``(b,)`` sequence-level rewards.
        logprobs: ``(b, a)`` policy logprobs of the sampled tokens.
        ref_logprobs: ``(b, a)`` reference logprobs of the same tokens.
        mask: ``(b, a)`` response mask, 0/1 or bool.
        kl_coef: the KL coefficient beta (e.g. a controller's ``value``).
        kind: KL estimator, one of ``KL_ESTIMATORS``.

    Returns:
        ``(b, a)`` token rewards; 0 at masked positions.
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be (b,) = {tuple(logprobs.shape[:1])}, got {tuple(scores.shape)}")
    keep = mask.bool()
    penalty = -kl_coef * kl_estimate(logprobs, ref_logprobs, kind)
    rewards = torch.where(keep, penalty, torch.zeros_like(penalty))
    score_at_last = torch.where(last_token_onehot(keep), scores.to(rewards.dtype).unsqueeze(-1), 0.0)
    return rewards + score_at_last
