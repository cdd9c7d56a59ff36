"""Reward handling and advantage dispatch (the algo math itself is tested in tests/algo)."""

from __future__ import annotations

import math
import statistics

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


def batch(scores=(1.0, 0.0, 0.5, 0.5), a=3):
    """4 rows (2 prompts x 2 samples) of response lengths 3, 2, 3, 2; old logprobs -1 and
    reference logprobs -1.5 on every token, so k1 = 0.5 per token (0.5 x length per row)."""
    n = len(scores)
    s = [RolloutSample(i // 2, [1, 2], [3] * (a - i % 2), [-1.0] * (a - i % 2), 0, "e") for i in range(n)]
    exp = pad_samples(s, 0)
    exp.scores, exp.valid = torch.tensor(scores), torch.ones(n)
    exp.old_logprobs = -1.0 * exp.response_mask
    exp.ref_logprobs = -1.5 * exp.response_mask
    exp.values = torch.zeros(n, a)
    return exp


def test_group_algorithms_by_hand():
    # KL shaping 0.1 x seq k1 [1.5, 1.0, 1.5, 1.0]: shaped scores [0.85, -0.1, 0.35, 0.4].
    # rloo: r_i - r_other -> [0.95, -0.95, -0.05, 0.05];
    # dr_grpo: r_i - group mean (0.375 and 0.375) -> [0.475, -0.475, -0.025, 0.025];
    # grpo: divided by the unbiased std of 2 samples |a - b| / sqrt 2 -> +-1/sqrt 2 (up to eps = 1e-6 in
    # the denominator: group 2's std is 0.035, hence rtol 1e-4).
    r2 = 1 / math.sqrt(2)
    expected = {"rloo": [0.95, -0.95, -0.05, 0.05], "dr_grpo": [0.475, -0.475, -0.025, 0.025],
                "grpo": [r2, -r2, -r2, r2]}
    for name, seq_adv in expected.items():
        exp, m = compute_advantages(batch(), AlgoConfig(name=name), kl_coef=0.1, group_size=2)
        torch.testing.assert_close(exp.advantages, torch.tensor(seq_adv)[:, None] * exp.response_mask,
                                   rtol=1e-4, atol=1e-6)
        assert exp.returns is None
        assert m["kl/mean"] == pytest.approx(1.25)  # mean of [1.5, 1.0, 1.5, 1.0]


def test_gae_algorithms_by_hand():
    # V = 0, gamma 1, lam 0.95, no whitening. Row 0 token rewards [-0.05, -0.05, 0.95]:
    # A_2 = 0.95, A_1 = -0.05 + 0.95 * 0.95 = 0.8525, A_0 = -0.05 + 0.95 * 0.8525 = 0.759875.
    # Row 1 (score 0, 2 tokens) [-0.05, -0.05]: A_1 = -0.05, A_0 = -0.05 - 0.95 * 0.05 = -0.0975.
    for name in ("ppo", "a2c"):
        algo = AlgoConfig(name=name, whiten_advantages=False, epochs=1, minibatches=1)
        exp, _ = compute_advantages(batch(), algo, kl_coef=0.1, group_size=2)
        torch.testing.assert_close(exp.advantages[:2], torch.tensor([[0.759875, 0.8525, 0.95], [-0.0975, -0.05, 0.0]]))
        torch.testing.assert_close(exp.returns[:2], exp.advantages[:2])  # V = 0


def test_reinforce_pp_by_hand():
    # Reward-to-go per row: [0.85, 0.9, 0.95], [-0.1, -0.05], [0.35, 0.4, 0.45], [0.4, 0.45];
    # whitened over those 10 tokens with their mean and unbiased std.
    exp, _ = compute_advantages(batch(), AlgoConfig(name="reinforce_pp"), kl_coef=0.1, group_size=2)
    togo = [[0.85, 0.9, 0.95], [-0.1, -0.05], [0.35, 0.4, 0.45], [0.4, 0.45]]
    flat = [v for row in togo for v in row]
    mean, std = statistics.mean(flat), statistics.stdev(flat)
    expected = torch.tensor([[(v - mean) / std for v in row] + [0.0] * (3 - len(row)) for row in togo])
    torch.testing.assert_close(exp.advantages, expected, rtol=1e-5, atol=1e-5)


def test_masked_rows_leave_baselines_and_means():
    # Group [1, 2, NaN, 3] with reward.nan_policy=mask -> GRPO [-1, 0, 1] for the valid ones.
    scores, valid, _ = prepare_scores([1.0, 2.0, math.nan, 3.0], RewardConfig(nan_policy="mask"), None, ["p"] * 4)
    exp = batch(scores=tuple(scores.tolist()))
    exp.valid = valid
    algo = AlgoConfig(name="grpo", kl_in_reward=False, kl_estimator="k2")
    out, m = compute_advantages(exp, algo, kl_coef=0.0, group_size=4)
    torch.testing.assert_close(out.advantages[:, 0], torch.tensor([-1.0, 0.0, 0.0, 1.0]), rtol=1e-5, atol=1e-5)
    # k2 = 0.5 * 0.5^2 = 0.125 per token: rows 0.375, 0.25, (masked), 0.25; the masked row is not averaged in
    assert m["kl/mean"] == pytest.approx((0.375 + 0.25 + 0.25) / 3)


def test_dapo_drops_groups_whose_rewards_agree():
    exp, m = compute_advantages(batch(scores=(1.0, 0.0, 0.5, 0.5)), AlgoConfig(name="dapo"), kl_coef=0.0,
                                group_size=2)
    assert m["rollout/dropped_groups"] == 1.0
    assert exp.valid.tolist() == [1.0, 1.0, 0.0, 0.0]  # group 2 (0.5, 0.5) masked out of the update
    assert (exp.advantages[2:] == 0).all() and exp.advantages[0, 0] > 0 > exp.advantages[1, 0]


def test_without_old_logprobs_kl_shaping_uses_the_rollout_logprobs():
    exp = batch()
    exp.rollout_logprobs = exp.old_logprobs.clone()
    expected, _ = compute_advantages(exp, AlgoConfig(name="ppo"), kl_coef=0.1, group_size=2)
    exp.old_logprobs = None
    got, _ = compute_advantages(exp, AlgoConfig(name="ppo"), kl_coef=0.1, group_size=2)
    torch.testing.assert_close(got.advantages, expected.advantages)
