"""From scored rollouts to advantages: reward handling (non-finite policy, running
normalisation) and the advantage phase. The math itself lives in ``rlhf_ray.algo``; which
estimator an algorithm uses comes from the algorithm table (``rlhf_ray/algorithms.py``)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from rlhf_ray.algo import (
    broadcast_sequence_advantages,
    discounted_returns,
    gae,
    group_advantages,
    groups_with_signal,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_ray.batch import Experience
from rlhf_ray.config import AlgoConfig, RewardConfig


class NonFiniteRewardError(RuntimeError):
    """A reward was NaN/Inf and ``reward.nan_policy=abort``."""


class RunningMoments:
    """Running mean/std of rewards (parallel-merge of batch moments, Chan et al.)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        b_mean, b_m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, s: dict) -> None:
        self.count, self.mean, self.m2 = int(s["count"]), float(s["mean"]), float(s["m2"])


def prepare_scores(raw: list[float], cfg: RewardConfig, moments: RunningMoments | None,
                   prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(scores (B,), valid (B,), metrics)``: non-finite rewards handled by ``cfg.nan_policy``
    (``mask`` zeroes them and marks the row invalid; ``skip_step`` is decided by the caller
    from ``reward/nonfinite``), then optional normalisation and clipping."""
    scores = torch.tensor(raw, dtype=torch.float32)
    finite = torch.isfinite(scores)
    bad = int((~finite).sum())
    if bad and cfg.nan_policy == "abort":
        first = int((~finite).nonzero()[0])
        raise NonFiniteRewardError(
            f"{bad} of {len(raw)} rewards are not finite (first: row {first}, prompt {prompts[first]!r}); "
            "set reward.nan_policy=mask or skip_step to continue past them"
        )
    scores = torch.where(finite, scores, torch.zeros_like(scores))
    metrics = {"reward/mean": float(scores[finite].mean()) if finite.any() else float("nan"),
               "reward/std": float(scores[finite].std()) if finite.sum() > 1 else 0.0,
               "reward/nonfinite": float(bad)}
    if moments is not None:
        moments.update(scores[finite])
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    if cfg.clip:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores * finite, finite.float(), metrics


def compute_advantages(exp: Experience, algo: AlgoConfig, kl_coef: float,
                       group_size: int) -> tuple[Experience, dict[str, float]]:
    """Fill ``advantages`` (and ``returns`` for critic algorithms) of a scored experience.

    The estimator comes from the algorithm table (``algo.spec.advantage``). Masked rows
    (``valid == 0``) take no part in any baseline, whitening or mean. With dynamic sampling
    (DAPO) the rows of groups whose rewards all agree are masked too, and counted in
    ``rollout/dropped_groups`` (refilling them with new prompts is the prompt stream's job).
    Without ``old_logprobs`` (a single on-policy pass) the KL shaping uses the engines'
    ``rollout_logprobs`` as the policy's."""
    spec = algo.spec
    valid = exp.valid
    extra: dict[str, float] = {}
    if spec.dynamic_sampling:
        keep = groups_with_signal(exp.scores, group_size, valid)
        extra["rollout/dropped_groups"] = float((~keep).sum())
        valid = valid * keep.repeat_interleave(group_size).to(valid.dtype)
    mask = exp.response_mask * valid[:, None]
    policy_logprobs = exp.old_logprobs if exp.old_logprobs is not None else exp.rollout_logprobs
    kl = kl_estimate(policy_logprobs, exp.ref_logprobs, algo.kl_estimator) * mask
    seq_kl = kl.sum(-1)
    shaping = kl_coef if algo.kl_in_reward else 0.0
    returns = None
    if spec.advantage in ("gae", "reinforce_pp"):
        rewards = kl_penalized_rewards(exp.scores, policy_logprobs, exp.ref_logprobs, mask, shaping,
                                       kind=algo.kl_estimator)
        if spec.advantage == "gae":
            advantages, returns = gae(rewards, exp.values, mask, algo.gamma, algo.lam)
            if algo.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
        else:
            advantages = reinforce_pp_advantages(rewards, mask, algo.gamma)
            returns = discounted_returns(rewards, mask, algo.gamma)
    else:  # one baseline per group of samples of the same prompt, over its valid samples
        shaped = exp.scores - shaping * seq_kl
        if spec.advantage == "group_norm":
            seq_adv = group_advantages(shaped, group_size, normalize_std=algo.std_normalized, valid=valid)
        else:
            seq_adv = rloo_advantages(shaped, group_size, valid=valid)
        advantages = broadcast_sequence_advantages(seq_adv, mask)
    metrics = {
        "kl/mean": float(masked_mean(seq_kl, exp.valid)),
        "kl/coef": kl_coef,
        "policy/advantage_mean": float(masked_mean(advantages, mask)),
        "rollout/response_len": float(exp.response_mask.sum(-1).mean()),
        **extra,
    }
    if returns is not None and exp.values is not None:
        metrics["critic/value_mean"] = float(masked_mean(exp.values, mask))
        metrics["critic/return_mean"] = float(masked_mean(returns, mask))
    return replace(exp, advantages=advantages * mask, returns=returns, valid=valid), metrics
