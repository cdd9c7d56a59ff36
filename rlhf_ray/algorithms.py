"""The algorithm table: ONE place that says what each ``algo.name`` means.

Every other module asks this table (``algorithm(name)``) instead of comparing algorithm names:
the advantage phase (``experience.py``) reads ``advantage``, ``normalize_std`` and
``dynamic_sampling``; the policy worker reads ``policy_loss``; the learners and the LR schedule
(``runtime.py``) read ``schedule``; the resource plan (``placement.py``) and validation
(``config.py``) read ``needs_critic`` and ``group_baseline``. Adding an algorithm is a row here,
a YAML under ``conf/algo/``, and (for a new loss) a function in ``rlhf_ray/algo/losses.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

ADVANTAGE_ESTIMATORS = ("gae", "group_norm", "rloo", "reinforce_pp")
POLICY_LOSSES = ("ppo", "pg", "gspo", "cispo")


@dataclass(frozen=True)
class Algorithm:
    """What an algorithm is made of (its paper in ``reference``)."""

    name: str
    advantage: str  # one of ADVANTAGE_ESTIMATORS
    policy_loss: str  # one of POLICY_LOSSES: ppo (clipped ratio), pg (-A log pi), gspo, cispo
    needs_critic: bool  # a value model (critic group) is trained
    default_loss_agg: str  # masks.AGG_MODES entry used when algo.loss_agg is empty
    single_pass: bool = False  # no importance ratio: exactly one epoch of one minibatch
    normalize_std: bool = True  # group_norm: divide by the group std (when algo.normalize_std is unset)
    dynamic_sampling: bool = False  # drop groups whose rewards all agree (DAPO)
    reference: str = ""

    @property
    def group_baseline(self) -> bool:
        """The baseline is computed within the samples of one prompt (needs >= 2 per prompt)."""
        return self.advantage in ("group_norm", "rloo")

    def schedule(self, epochs: int, minibatches: int) -> tuple[int, int]:
        """``(epochs, minibatches)`` actually run per batch, for the policy AND the critic."""
        return (1, 1) if self.single_pass else (epochs, minibatches)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("ppo", "gae", "ppo", True, "token_mean",
              reference="Schulman et al. 2017; Ouyang et al. 2022 (InstructGPT)"),
    Algorithm("a2c", "gae", "pg", True, "token_mean", single_pass=True,
              reference="Mnih et al. 2016 (A3C, synchronous)"),
    Algorithm("grpo", "group_norm", "ppo", False, "seq_mean_token_mean",
              reference="Shao et al. 2024 (DeepSeekMath)"),
    Algorithm("dr_grpo", "group_norm", "ppo", False, "seq_mean_token_sum_norm", normalize_std=False,
              reference="Liu et al. 2025, Understanding R1-Zero-Like Training (Dr. GRPO)"),
    Algorithm("dapo", "group_norm", "ppo", False, "token_mean", dynamic_sampling=True,
              reference="Yu et al. 2025 (DAPO): clip-higher, dynamic sampling, token-level loss"),
    Algorithm("gspo", "group_norm", "gspo", False, "seq_mean_token_mean",
              reference="Zheng et al. 2025, Group Sequence Policy Optimization"),
    Algorithm("cispo", "group_norm", "cispo", False, "token_mean",
              reference="MiniMax 2025 (MiniMax-M1), CISPO"),
    Algorithm("rloo", "rloo", "ppo", False, "token_mean",
              reference="Ahmadian et al. 2024 (Back to Basics)"),
    Algorithm("reinforce_pp", "reinforce_pp", "ppo", False, "token_mean",
              reference="Hu 2025 (REINFORCE++)"),
)}


def algorithm(name: str) -> Algorithm:
    """The table row of ``name``; a clear error naming ``algo.name`` otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algo.name: {name!r} is not one of {', '.join(ALGORITHMS)}") from None
