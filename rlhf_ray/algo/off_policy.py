"""Off-policy correction between the rollout engines' behaviour policy and the learner.

The tokens were sampled by vLLM (behaviour logprobs ``mu``), but the loss treats them as samples of
the learner's old policy ``pi_old``. The two differ because the engines' numerics differ from the
learner's, and, in asynchronous training, because the engines' weights are older. The per-token
importance weight ``w = pi_old / mu`` (detached) corrects the policy gradient:

- **TIS** (truncated IS): ``min(w, cap)``. Yao et al. 2025, "Your Efficient RL Framework Secretly
  Brings You Off-Policy RL Training" (fengyao.notion.site/off-policy-rl), and veRL
  ``rollout_corr`` ``token_is``; the truncation bounds the variance.
- **MIS** (masked IS): ``w`` where ``w <= cap``, else 0: tokens (or whole sequences) whose weight
  exceeds the cap are dropped from the gradient instead of truncated (Liu, Li et al. 2025, "When
  speed kills stability: demystifying RL collapse from the training-inference mismatch"; veRL
  ``rollout_rs``). Masked tokens keep counting in the loss's denominator (a weight of 0).

``level="sequence"`` uses one weight per row, ``exp(sum_t log w_t)``, on all of its tokens.
Owns the weights and their statistics; the policy loss multiplies them into its per-token loss.
"""

from __future__ import annotations

import torch

from .masks import LossNormalizer, aggregate_loss, check_same_shape, masked_sum

OFF_POLICY_MODES = ("none", "tis", "mis")
OFF_POLICY_LEVELS = ("token", "sequence")

# exp(20) ~ 4.9e8: a larger log-weight is a broken sample; keep the arithmetic finite.
LOG_WEIGHT_CLAMP = 20.0


def importance_weights(
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    cap: float,
    level: str = "token",
    norm: LossNormalizer | None = None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Detached IS weights ``pi_old / mu`` per ``mode`` and their statistics on the valid tokens.

    Args:
        old_logprobs: ``(b, a)`` the learner's logprobs of the sampled tokens before the update
            (or the current ones, detached, in a single on-policy pass).
        behaviour_logprobs: ``(b, a)`` the rollout engine's logprobs of the same tokens.
        mask: ``(b, a)`` response mask.
        mode: one of ``OFF_POLICY_MODES``; ``none`` returns no weights (statistics still computed).
        cap: truncation (TIS) or masking (MIS) threshold, > 1.
        level: ``token`` or ``sequence`` (one weight per row, the product of its token weights).
        norm: the full minibatch's counts; the statistics are then this batch's shares.

    Returns:
        ``(weights (b, a) or None, metrics)``; metrics (token means over valid tokens):
        ``rollout/mismatch_kl`` = k3 estimate of ``KL(mu || pi_old)`` on the sampled tokens
        (``w - 1 - log w``), ``rollout/is_weight_mean`` = mean raw weight before truncation or
        masking, ``rollout/is_clipped_frac`` = fraction of tokens whose weight exceeds ``cap``.
    """
    check_same_shape(old_logprobs=old_logprobs, behaviour_logprobs=behaviour_logprobs, mask=mask)
    if mode not in OFF_POLICY_MODES:
        raise ValueError(f"unknown off-policy correction {mode!r}; expected one of {OFF_POLICY_MODES}")
    if level not in OFF_POLICY_LEVELS:
        raise ValueError(f"unknown off-policy level {level!r}; expected one of {OFF_POLICY_LEVELS}")
    keep = mask.bool()
    with torch.no_grad():
        log_w = torch.where(keep, old_logprobs - behaviour_logprobs, torch.zeros_like(old_logprobs))
        log_w = log_w.clamp(-LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP)
        token_w = torch.exp(log_w)
        if level == "sequence":
            seq_log_w = masked_sum(log_w, keep, dim=-1).clamp(-LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP)
            raw = torch.exp(seq_log_w).unsqueeze(-1).expand_as(log_w)
        else:
            raw = token_w
        over = raw > cap
        metrics = {
            "rollout/mismatch_kl": aggregate_loss(token_w - 1 - log_w, keep, "token_mean", norm),
            "rollout/is_weight_mean": aggregate_loss(raw, keep, "token_mean", norm),
            "rollout/is_clipped_frac": aggregate_loss(over.float(), keep, "token_mean", norm),
        }
        if mode == "none":
            return None, metrics
        weights = raw.clamp(max=cap) if mode == "tis" else torch.where(over, torch.zeros_like(raw), raw)
        return torch.where(keep, weights, torch.zeros_like(weights)), metrics


def resolve_off_policy_mode(mode: str, max_staleness: int) -> str:
    """``auto`` -> ``tis`` when samples may be stale (``max_staleness > 0``), else ``none``."""
    if mode == "auto":
        return "tis" if max_staleness > 0 else "none"
    return mode
