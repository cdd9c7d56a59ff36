"""Tests for rlhf_ray.algo.losses, with the arithmetic walked through in comments
(after torchtune tests/torchtune/rlhf/loss/test_ppo_loss.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algo.kl import kl_estimate
from rlhf_ray.algo.losses import (
    a2c_policy_loss,
    kl_loss,
    pairwise_bt_loss,
    ppo_policy_loss,
    ranking_loss,
    ranking_pairs,
    sft_loss,
    value_loss,
)
from rlhf_ray.algo.masks import AGG_MODES, aggregate_loss

# Four valid tokens with ratios 1.0, 1.5, 0.5, 1.1 (old_logprobs = 0, so logprobs = ln ratio),
# plus one padding token whose logprob is junk (+inf) and must not matter.
RATIOS = [1.0, 1.5, 0.5, 1.1]
ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 1, 0]])


def _logprobs() -> torch.Tensor:
    return torch.tensor([[math.log(r) for r in RATIOS] + [float("inf")]], requires_grad=True)


def test_ppo_policy_loss_by_hand():
    logprobs = _logprobs()
    loss, metrics = ppo_policy_loss(logprobs, torch.zeros(1, 5), ADVANTAGES, MASK, clip_eps=0.2)
    # per token max(-A * ratio, -A * clip(ratio, 0.8, 1.2)):
    #   t0: ratio 1.0, A=+1: max(-1.0, -1.0) = -1.0
    #   t1: ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2   (clipped: no credit beyond 1.2)
    #   t2: ratio 0.5, A=-1: max( 0.5,  0.8) =  0.8   (clipped)
    #   t3: ratio 1.1, A=-1: max( 1.1,  1.1) =  1.1
    # token_mean = (-1.0 - 1.2 + 0.8 + 1.1) / 4 = -0.075
    torch.testing.assert_close(loss, torch.tensor(-0.075))
    # clipfrac: t1 and t2 have |ratio - 1| > 0.2 -> 2 / 4
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.5))
    # approx_kl = mean((ratio - 1) - ln ratio):
    #   0, 0.5 - ln 1.5 = 0.094535, -0.5 + ln 2 = 0.193147, 0.1 - ln 1.1 = 0.004690 -> sum 0.292372 / 4
    expected_kl = sum((r - 1) - math.log(r) for r in RATIOS) / 4
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl))
    assert not metrics["clipfrac"].requires_grad and not metrics["approx_kl"].requires_grad
    # Gradient d loss / d logprob = -A * ratio / 4 on the unclipped branch, 0 where the clip is chosen
    # and 0 on padding (no NaN from the inf there).
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, 0.0, 0.0, 1.1 / 4, 0.0]]))


def test_ppo_policy_loss_is_pessimistic():
    # ratio 0.5 with A=+1: unclipped -0.5, clipped -0.8 -> the max (worse objective) -0.5 is kept,
    # so moving away from a good action is not hidden by the clip.
    loss, metrics = ppo_policy_loss(
        torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    )
    torch.testing.assert_close(loss, torch.tensor(-0.5))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(1.0))


def test_ppo_policy_loss_clip_higher():
    # clip range [0.8, 1.6]: t1 (ratio 1.5) is no longer clipped -> -1.5 instead of -1.2.
    # loss = (-1.0 - 1.5 + 0.8 + 1.1) / 4 = -0.15; only t2 is outside -> clipfrac 1/4.
    loss, metrics = ppo_policy_loss(_logprobs(), torch.zeros(1, 5), ADVANTAGES, MASK, 0.2, clip_eps_high=0.6)
    torch.testing.assert_close(loss, torch.tensor(-0.15))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.25))


def test_ppo_policy_loss_on_policy_equals_negative_mean_advantage():
    # First minibatch of an epoch: logprobs == old_logprobs -> ratio 1, loss = -mean(A).
    torch.manual_seed(0)
    logprobs = torch.randn(3, 6)
    advantages = torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [0] * 6])
    for mode in AGG_MODES:
        loss, metrics = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, agg_mode=mode)
        torch.testing.assert_close(loss, aggregate_loss(-advantages, mask, mode))
        assert metrics["clipfrac"] == 0 and metrics["approx_kl"] == 0


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    old_values = torch.tensor([[1.0, 1.0, 3.5, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # eps = 0.2, V_clipped = V_old + clip(V - V_old, -0.2, 0.2):
    #   t0: V=1,   V_clip=1.0: max((1-2)^2, (1-2)^2)     = 1
    #   t1: V=2,   V_clip=1.2: max((2-2)^2, (1.2-2)^2)   = 0.64
    #   t2: V=3,   V_clip=3.3: max((3-2)^2, (3.3-2)^2)   = 1.69
    # 0.5 * (1 + 0.64 + 1.69) / 3 = 0.555; clipfrac: t1, t2 moved more than 0.2 -> 2/3
    loss, metrics = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.555))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(2 / 3))
    # Unclipped: 0.5 * (1 + 0 + 1) / 3 = 1/3, clipfrac 0.
    loss, metrics = value_loss(values, old_values, returns, mask, clip_eps=None)
    torch.testing.assert_close(loss, torch.tensor(1 / 3))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.0))


def test_a2c_policy_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, 7.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, -0.5, 3.0]])
    mask = torch.tensor([[1, 1, 0]])
    # -A * logp = [2.0, -1.0] -> mean 0.5; gradient -A / 2 = [-1.0, 0.25, 0 (padding)].
    loss, metrics = a2c_policy_loss(logprobs, advantages, mask)
    torch.testing.assert_close(loss, torch.tensor(0.5))
    assert metrics == {}
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.25, 0.0]]))


def test_kl_loss():
    # One valid token with pi = 1/2, ref = 1/4: k3 = ln 2 - 0.5 = 0.1931; the padding token is ignored.
    logprobs = torch.tensor([[math.log(0.5), 0.0]])
    ref_logprobs = torch.tensor([[math.log(0.25), -30.0]])
    mask = torch.tensor([[1, 0]])
    torch.testing.assert_close(kl_loss(logprobs, ref_logprobs, mask), torch.tensor(math.log(2) - 0.5))
    torch.testing.assert_close(kl_loss(logprobs, ref_logprobs, mask, kind="k1"), torch.tensor(math.log(2)))
    torch.manual_seed(0)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    m = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    expected = aggregate_loss(kl_estimate(a, b, "k3"), m, "seq_mean_token_mean")
    torch.testing.assert_close(kl_loss(a, b, m, agg_mode="seq_mean_token_mean"), expected)


def test_pairwise_bt_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # -log sigmoid(1) = ln(1 + e^-1) = 0.313262; -log sigmoid(0) = ln 2 = 0.693147; mean 0.503204
    expected = (math.log1p(math.exp(-1)) + math.log(2)) / 2
    torch.testing.assert_close(pairwise_bt_loss(chosen, rejected), torch.tensor(expected))
    # margin 1: first pair becomes -log sigmoid(0) = ln 2; second -log sigmoid(-1) = ln(1 + e).
    expected = (math.log(2) + math.log1p(math.e)) / 2
    torch.testing.assert_close(pairwise_bt_loss(chosen, rejected, margin=1.0), torch.tensor(expected))


def test_ranking_pairs():
    assert ranking_pairs(2) == [(0, 1)]
    assert ranking_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert len(ranking_pairs(9)) == math.comb(9, 2)


def test_ranking_loss_k2_equals_pairwise_bt_loss():
    torch.manual_seed(0)
    rewards = torch.randn(5, 2)
    loss, metrics = ranking_loss(rewards)
    torch.testing.assert_close(loss, pairwise_bt_loss(rewards[:, 0], rewards[:, 1]))
    torch.testing.assert_close(metrics["accuracy"], (rewards[:, 0] > rewards[:, 1]).float().mean())


def test_ranking_loss_k4_by_hand():
    # Row [3, 2, 1, 0] ranked best to worst: 6 pairs with differences 1, 2, 3, 1, 2, 1;
    # loss = (3 * softplus(-1) + 2 * softplus(-2) + softplus(-3)) / 6, all pairs correct.
    loss, metrics = ranking_loss(torch.tensor([[3.0, 2.0, 1.0, 0.0]]))

    def sp(d: float) -> float:  # softplus(-d) = -log sigmoid(d)
        return math.log1p(math.exp(-d))

    torch.testing.assert_close(loss, torch.tensor((3 * sp(1) + 2 * sp(2) + sp(3)) / 6))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor(1.0))
    # Row [3, 1, 2, 0]: only the pair (1, 2) is misordered -> accuracy 5/6.
    _, metrics = ranking_loss(torch.tensor([[3.0, 1.0, 2.0, 0.0]]))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor(5 / 6))


def test_ranking_loss_matches_plain_loop():
    # Mean over rows of the per-row mean over the C(k, 2) pairs (InstructGPT eq. 1).
    torch.manual_seed(1)
    rewards = torch.randn(3, 5, dtype=torch.float64)
    per_row = []
    for row in rewards.tolist():
        pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
        per_row.append(sum(math.log1p(math.exp(-(row[i] - row[j]))) for i, j in pairs) / len(pairs))
    loss, _ = ranking_loss(rewards)
    torch.testing.assert_close(loss, torch.tensor(sum(per_row) / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="k >= 2"):
        ranking_loss(torch.zeros(3, 1))


def test_sft_loss():
    # Uniform logits over 4 tokens: every token has NLL ln 4.
    torch.testing.assert_close(
        sft_loss(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)),
        torch.tensor(math.log(4)),
    )
    # Parity with F.cross_entropy(ignore_index=-100); masked labels may be -100.
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 7)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    labels = torch.where(loss_mask.bool(), torch.randint(0, 7, (2, 5)), -100)
    expected = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(logits, labels, loss_mask), expected)
    torch.testing.assert_close(sft_loss(logits, labels, torch.zeros(2, 5)), torch.tensor(0.0))
