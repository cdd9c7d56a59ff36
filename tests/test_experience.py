"""Reward handling and advantage dispatch (the algo math itself is tested in tests/algo)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.batch import RolloutSample, pad_samples
from rlhf_ray.config import AlgoConfig, RewardConfig
from rlhf_ray.experience import NonFiniteRewardError, RunningMoments, compute_advantages, prepare_scores


def test_nan_reward_abort_names_the_row():
    with pytest.raises(NonFiniteRewardError, match="row 1"):
        prepare_scores([1.0, math.nan], RewardConfig(nan_policy="abort"), None, ["a", "b"])


def test_nan_reward_mask_zeroes_and_invalidates():
    scores, valid, m = prepare_scores([1.0, math.inf, 0.5], RewardConfig(nan_policy="mask"), None, ["a"] * 3)
    assert scores.tolist() == [1.0, 0.0, 0.5] and valid.tolist() == [1.0, 0.0, 1.0]
    assert m["reward/nonfinite"] == 1 and m["reward/mean"] == pytest.approx(0.75)


def test_running_moments_match_torch():
    rm, xs = RunningMoments(), torch.randn(100)
    for chunk in xs.split(7):
        rm.update(chunk)
    assert rm.mean == pytest.approx(float(xs.mean()), abs=1e-5)
    assert rm.std == pytest.approx(float(xs.std()), abs=1e-5)


def batch(n=4, a=3):
    s = [RolloutSample(i // 2, [1, 2], [3] * (a - i % 2), [-1.0] * (a - i % 2), 0, "e") for i in range(n)]
    exp = pad_samples(s, 0)
    exp.scores, exp.valid = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.ones(n)
    exp.old_logprobs = exp.ref_logprobs = -torch.ones(n, a) * exp.response_mask
    exp.values = torch.zeros(n, a)
    return exp


@pytest.mark.parametrize("name", ["ppo", "a2c", "grpo", "rloo", "reinforce_pp"])
def test_every_algorithm_fills_masked_advantages(name):
    exp, m = compute_advantages(batch(), AlgoConfig(name=name), kl_coef=0.1, group_size=2)
    assert exp.advantages.shape == exp.response_mask.shape
    assert torch.all(exp.advantages[exp.response_mask == 0] == 0)
    assert (exp.returns is not None) == (name in ("ppo", "a2c", "reinforce_pp"))
    assert m["kl/mean"] == 0.0  # identical policy and reference


def test_grpo_group_baseline():
    exp, _ = compute_advantages(batch(), AlgoConfig(name="grpo"), kl_coef=0.0, group_size=2)
    # group 0 = scores (1, 0): better sample positive, worse negative; group 1 ties -> 0
    assert exp.advantages[0, 0] > 0 > exp.advantages[1, 0]
    assert torch.all(exp.advantages[2:] == 0)
