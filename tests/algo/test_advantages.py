"""Tests for rlhf_ray.algo.advantages: hand-computed values and parity with plain Python loops."""

import math
import statistics

import pytest
import torch

from rlhf_ray.algo.advantages import (
    broadcast_sequence_advantages,
    discounted_returns,
    gae,
    group_advantages,
    groups_with_signal,
    reinforce_pp_advantages,
    rloo_advantages,
)


def _ragged(b: int, a: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Random rewards, values and a right-padded mask with lengths in [0, a] (one empty row)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [a, 0, 1] + torch.randint(1, a + 1, (b - 3,), generator=gen).tolist()
    mask = torch.tensor([[1] * n + [0] * (a - n) for n in lengths])
    rewards = torch.randn(b, a, generator=gen, dtype=torch.float64)
    values = torch.randn(b, a, generator=gen, dtype=torch.float64)
    return rewards, values, mask, lengths


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Plain per-row GAE, CleanRL ppo.py style: V = 0 after the last valid token."""
    adv = [[0.0] * rewards.shape[1] for _ in lengths]
    for i, n in enumerate(lengths):
        lastgaelam = 0.0
        for t in reversed(range(n)):
            next_value = float(values[i, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[i][t] = lastgaelam
    return torch.tensor(adv, dtype=torch.float64)


def _returns_loop(rewards, lengths, gamma):
    out = [[0.0] * rewards.shape[1] for _ in lengths]
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            running = float(rewards[i, t]) + gamma * running
            out[i][t] = running
    return torch.tensor(out, dtype=torch.float64)


def test_gae_by_hand():
    # One row of 3 valid tokens + 1 padding token (with junk reward 5 and value 9 in the padding).
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # gamma = 1, lam = 0.5; V after the last valid token is 0 (episode ends).
    # delta_2 = 1 + 0 - 0.7 = 0.3;  delta_1 = 0 + 0.7 - 0.6 = 0.1;  delta_0 = 0 + 0.6 - 0.5 = 0.1
    # A_2 = 0.3;  A_1 = 0.1 + 0.5 * 0.3 = 0.25;  A_0 = 0.1 + 0.5 * 0.25 = 0.225
    # returns = A + V = [0.725, 0.85, 1.0]
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0, 0.0]]))


def test_gae_matches_plain_loop_on_ragged_batch():
    rewards, values, mask, lengths = _ragged(b=8, a=12, seed=0)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    expected = _gae_loop(rewards, values, lengths, 0.99, 0.95)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)
    assert (adv[1] == 0).all() and (ret[1] == 0).all()  # the empty row


def test_gae_ignores_padding_values_and_rewards():
    rewards, values, mask, _ = _ragged(b=6, a=9, seed=1)
    junk = torch.full_like(values, 1e3)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    adv2, ret2 = gae(
        torch.where(mask.bool(), rewards, junk), torch.where(mask.bool(), values, junk), mask, 0.9, 0.8
    )
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)


def test_gae_with_lambda_one_returns_are_discounted_returns():
    # lam = 1: A_t + V_t telescopes to the Monte-Carlo return sum_l gamma^l r_{t+l}.
    rewards, values, mask, _ = _ragged(b=5, a=7, seed=2)
    _, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret, discounted_returns(rewards, mask, 0.9))


def test_discounted_returns_by_hand_and_loop():
    # r = [1, 2, 3], gamma = 0.5: G_2 = 3; G_1 = 2 + 0.5 * 3 = 3.5; G_0 = 1 + 0.5 * 3.5 = 2.75
    out = discounted_returns(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1, 1, 1, 0]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[2.75, 3.5, 3.0, 0.0]]))
    rewards, _, mask, lengths = _ragged(b=7, a=10, seed=3)
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.97), _returns_loop(rewards, lengths, 0.97))


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 0: mean 2, unbiased std 1 -> [-1, 0, 1]
    # group 1: mean 2, deviations [-2, -2, 4], var (4 + 4 + 16) / 2 = 12, std 2*sqrt(3) = 3.4641
    s = 2 * math.sqrt(3)
    expected = torch.tensor([-1.0, 0.0, 1.0, -2 / s, -2 / s, 4 / s])
    torch.testing.assert_close(group_advantages(scores, 3, eps=0.0), expected)
    # normalize_std=False: mean baseline only (Dr. GRPO).
    torch.testing.assert_close(
        group_advantages(scores, 3, normalize_std=False), torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    )


def test_group_advantages_match_plain_loop_and_identical_group_is_zero():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(24, generator=gen, dtype=torch.float64)
    n = 4
    expected = []
    for g in range(0, 24, n):
        group = scores[g : g + n].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        expected += [(r - mean) / (std + 1e-6) for r in group]
    torch.testing.assert_close(group_advantages(scores, n), torch.tensor(expected, dtype=torch.float64))
    same = group_advantages(torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 0.5]), 3)
    assert torch.isfinite(same).all() and (same[:3] == 0).all()


def test_rloo_by_hand_and_loop():
    # [1, 2, 3]: 1 - (2+3)/2 = -1.5;  2 - (1+3)/2 = 0;  3 - (1+2)/2 = 1.5
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3), torch.tensor([-1.5, 0.0, 1.5])
    )
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(20, generator=gen, dtype=torch.float64)
    n = 5
    expected = []
    for g in range(0, 20, n):
        group = scores[g : g + n].tolist()
        expected += [r - statistics.mean(group[:i] + group[i + 1 :]) for i, r in enumerate(group)]
    torch.testing.assert_close(rloo_advantages(scores, n), torch.tensor(expected, dtype=torch.float64))
    # Identity: RLOO = n / (n - 1) * (r - group mean).
    torch.testing.assert_close(
        rloo_advantages(scores, n), n / (n - 1) * group_advantages(scores, n, normalize_std=False)
    )


def test_masked_rows_are_out_of_group_baselines():
    # Group [1, 2, masked (a NaN reward zeroed), 3]: the masked row is neither baseline nor
    # baselined. GRPO over [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1]; RLOO: 1 - (2+3)/2 = -1.5,
    # 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5. Group 2 has one valid sample: no baseline -> 0.
    scores = torch.tensor([1.0, 2.0, 0.0, 3.0, 5.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(scores, 4, eps=0.0, valid=valid),
                               torch.tensor([-1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(scores, 4, normalize_std=False, valid=valid),
                               torch.tensor([-1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rloo_advantages(scores, 4, valid=valid),
                               torch.tensor([-1.5, 0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0]))
    # Without the mask, the zeroed score would pull the baseline: [1, 2, 0, 3] has mean 1.5.
    assert group_advantages(scores, 4, eps=0.0)[1] != 0


def test_groups_with_signal_dapo_dynamic_sampling():
    # pairs: [1, 1] all agree -> drop; [0, 1] -> keep; [0.5, masked] one valid -> drop;
    # [2, 2] -> drop; [7, 2] -> keep.
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 2.0, 2.0, 7.0, 2.0])
    valid = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    keep = groups_with_signal(scores, 2, valid)
    assert keep.tolist() == [False, True, False, False, True]
    assert groups_with_signal(torch.tensor([0.0, 0.05]), 2, tol=0.1).tolist() == [False]


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages])
def test_group_baselines_reject_bad_group_size(fn):
    with pytest.raises(ValueError, match="multiple of group_size"):
        fn(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        fn(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        fn(torch.zeros(4, 1), 2)


def test_reinforce_pp_is_whitened_reward_to_go():
    rewards, _, mask, lengths = _ragged(b=6, a=8, seed=6)
    out = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    # Plain loop: reward-to-go per row, then (x - mean) / std over all valid tokens of the batch.
    returns = _returns_loop(rewards, lengths, 1.0)
    valid = [float(returns[i, t]) for i, n in enumerate(lengths) for t in range(n)]
    mean, std = statistics.mean(valid), statistics.stdev(valid)
    expected = torch.where(mask.bool(), (returns - mean) / std, torch.zeros_like(returns))
    torch.testing.assert_close(out, expected)


def test_reinforce_pp_by_hand():
    # rewards [1, 2 | pad] and [3 | pad, pad], gamma 1: reward-to-go [3, 2] and [3];
    # valid values 3, 2, 3: mean 8/3, deviations 1/3, -2/3, 1/3, unbiased var (1 + 4 + 1)/9 / 2 = 1/3
    # -> whitened 1/3 / sqrt(1/3) = 0.57735, -1.154701, 0.57735
    out = reinforce_pp_advantages(torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]),
                                  torch.tensor([[1, 1, 0], [1, 0, 0]]), gamma=1.0)
    r = math.sqrt(1 / 3)
    torch.testing.assert_close(out, torch.tensor([[r, -2 * r, 0.0], [r, 0.0, 0.0]]), rtol=1e-5, atol=1e-5)


def test_broadcast_sequence_advantages():
    adv = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    expected = torch.tensor([[0.5, 0.5, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(broadcast_sequence_advantages(adv, mask), expected)
    with pytest.raises(ValueError, match="adv"):
        broadcast_sequence_advantages(torch.zeros(2), mask)
