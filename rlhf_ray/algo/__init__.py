"""Pure RL math for rlhf_ray: masked reductions, logprobs, KL, advantages, losses and the
off-policy (importance-sampling) correction.

Imports only torch and the standard library; functions take tensors and numbers, never configs.
"""

from .advantages import (
    broadcast_sequence_advantages,
    discounted_returns,
    gae,
    group_advantages,
    groups_with_signal,
    reinforce_pp_advantages,
    rloo_advantages,
)
from .kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalized_rewards,
    last_token_onehot,
)
from .logprobs import entropy_from_logits, logprobs_from_logits
from .losses import (
    KL_LOSS_ESTIMATORS,
    a2c_policy_loss,
    cispo_policy_loss,
    gspo_policy_loss,
    kl_loss,
    pairwise_bt_loss,
    ppo_policy_loss,
    ranking_loss,
    ranking_pairs,
    sft_loss,
    value_loss,
)
from .masks import (
    AGG_MODES,
    LossNormalizer,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from .off_policy import OFF_POLICY_LEVELS, OFF_POLICY_MODES, importance_weights, resolve_off_policy_mode

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "KL_LOSS_ESTIMATORS",
    "LossNormalizer",
    "OFF_POLICY_LEVELS",
    "OFF_POLICY_MODES",
    "cispo_policy_loss",
    "groups_with_signal",
    "gspo_policy_loss",
    "importance_weights",
    "resolve_off_policy_mode",
    "AdaptiveKLController",
    "FixedKLController",
    "a2c_policy_loss",
    "aggregate_loss",
    "broadcast_sequence_advantages",
    "discounted_returns",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_estimate",
    "kl_loss",
    "kl_penalized_rewards",
    "last_token_onehot",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_bt_loss",
    "ppo_policy_loss",
    "ranking_loss",
    "ranking_pairs",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sft_loss",
    "value_loss",
]
