"""Tests for rlhf_ray.algo.losses, with the arithmetic walked through in comments
(after torchtune tests/torchtune/rlhf/loss/test_ppo_loss.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algo.losses import (
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


def test_kl_loss_by_hand():
    # One valid token with pi = 1/2, ref = 1/4 (log-ratio ln 2); the padding token is ignored.
    logprobs = torch.tensor([[math.log(0.5), 0.0]])
    ref_logprobs = torch.tensor([[math.log(0.25), -30.0]])
    mask = torch.tensor([[1, 0]])
    ln2 = math.log(2)
    # k2 = 0.5 * (ln 2)^2 = 0.240227 (the default); k3 = ref/pi - 1 - ln(ref/pi) = 0.5 - 1 + ln 2 = 0.193147
    torch.testing.assert_close(kl_loss(logprobs, ref_logprobs, mask), torch.tensor(0.5 * ln2**2))
    torch.testing.assert_close(kl_loss(logprobs, ref_logprobs, mask, kind="k3"), torch.tensor(ln2 - 0.5))
    # Sampled by pi_old = 1/4 (a reused sample): weight pi / pi_old = 2 -> 2 * 0.240227
    old = torch.tensor([[math.log(0.25), 0.0]])
    torch.testing.assert_close(kl_loss(logprobs, ref_logprobs, mask, old_logprobs=old), torch.tensor(ln2**2))
    # seq_mean_token_mean over two rows: row 0 tokens k2 = [0.240227, 0 (pi == ref)] -> 0.120113;
    # row 1 one token with log-ratio 1 -> k2 = 0.5; mean over rows (0.120113 + 0.5) / 2 = 0.310057
    lp = torch.tensor([[math.log(0.5), -1.0], [0.0, 0.0]])
    ref = torch.tensor([[math.log(0.25), -1.0], [-1.0, 0.0]])
    m = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(kl_loss(lp, ref, m, agg_mode="seq_mean_token_mean"),
                               torch.tensor((0.5 * ln2**2 / 2 + 0.5) / 2))
    with pytest.raises(ValueError, match="k1"):
        kl_loss(logprobs, ref_logprobs, mask, kind="k1")


# A small categorical policy: pi = softmax(theta) over 4 tokens, a fixed reference, and an older
# sampling policy pi_old for the reused-sample case.
THETA = torch.tensor([0.3, -0.2, 1.1, -0.7], dtype=torch.float64)
THETA_OLD = torch.tensor([0.0, 0.4, 0.5, -0.3], dtype=torch.float64)
REF = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)


def _exact_grad(kl_fn) -> torch.Tensor:
    """d/dtheta of a closed-form KL, by autograd."""
    theta = THETA.clone().requires_grad_(True)
    return torch.autograd.grad(kl_fn(torch.log_softmax(theta, -1)), theta)[0]


def _expected_estimator_grad(kind: str, sampled_from_old: bool, weighted: bool = True) -> torch.Tensor:
    """E_{y ~ sampler}[d/dtheta kl_loss at token y], exactly: enumerate the support, weight by the
    sampler's probability (pi, or pi_old for reused samples)."""
    theta = THETA.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    sampler = torch.log_softmax(THETA_OLD, -1) if sampled_from_old else logp.detach()
    total = torch.zeros_like(THETA)
    for y in range(4):
        old = sampler[y].view(1, 1) if weighted else None
        loss = kl_loss(logp[y].view(1, 1), REF.log()[y].view(1, 1), torch.ones(1, 1), kind=kind, old_logprobs=old)
        total += sampler[y].exp() * torch.autograd.grad(loss, theta, retain_graph=True)[0]
    return total


def test_kl_loss_gradient_direction_on_a_categorical():
    forward = _exact_grad(lambda logp: (logp.exp() * (logp - REF.log())).sum())  # grad KL(pi || ref)
    reverse = _exact_grad(lambda logp: (REF * (REF.log() - logp)).sum())  # grad KL(ref || pi)
    assert (forward - reverse).abs().max() > 0.05  # the two directions really differ here
    # k2's expected gradient is grad KL(pi || ref), on-policy and on reused samples (weight pi/pi_old).
    torch.testing.assert_close(_expected_estimator_grad("k2", False), forward)
    torch.testing.assert_close(_expected_estimator_grad("k2", True), forward)
    # k3's is grad KL(ref || pi): the documented, reverse direction.
    torch.testing.assert_close(_expected_estimator_grad("k3", False), reverse)
    torch.testing.assert_close(_expected_estimator_grad("k3", True), reverse)
    # Without the importance weight, reused samples give a different (wrong) gradient.
    assert (_expected_estimator_grad("k2", True, weighted=False) - forward).abs().max() > 0.01


def test_k1_as_a_loss_has_zero_expected_gradient():
    # Why k1 is rejected as a loss term: E_pi[grad (log pi - log ref)] = E_pi[grad log pi] = 0.
    theta = THETA.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    expected = sum(logp[y].exp().detach() * torch.autograd.grad(logp[y] - REF.log()[y], theta, retain_graph=True)[0]
                   for y in range(4))
    torch.testing.assert_close(expected, torch.zeros(4, dtype=torch.float64))


def test_gspo_sequence_ratio_by_hand():
    # Row 0: token ratios 1.2 and 0.8 -> s = exp(mean(ln 1.2, ln 0.8)) = sqrt(0.96) = 0.979796, inside
    #        [0.8, 1.2]: both tokens get -A * s = -0.979796, gradient -A * s / 2 tokens / 2 rows each.
    # Row 1: token ratios 2 and 2 -> s = 2, A = +1, clipped to 1.2: -1.2, no gradient.
    # seq_mean_token_mean: (-0.979796 - 1.2) / 2 = -1.089898
    logprobs = torch.tensor([[math.log(1.2), math.log(0.8)], [math.log(2), math.log(2)]], requires_grad=True)
    adv = torch.ones(2, 2)
    loss, m = gspo_policy_loss(logprobs, torch.zeros(2, 2), adv, torch.ones(2, 2), clip_eps=0.2, clip_eps_high=0.2)
    s = math.sqrt(0.96)
    torch.testing.assert_close(loss, torch.tensor((-s - 1.2) / 2))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-s / 4, -s / 4], [0.0, 0.0]]))
    torch.testing.assert_close(m["clipfrac"], torch.tensor(0.5))  # row 1's two tokens of 4
    # GSPO sees only the sequence ratio: token log-ratios +0.5 and -0.5 (ratios 1.65 and 0.61, both
    # outside PPO's token range) give s = 1: no clipping, loss -A = -1.
    lp = torch.tensor([[0.5, -0.5]])
    loss, _ = gspo_policy_loss(lp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor(-1.0))


def test_cispo_clipped_detached_weight_by_hand():
    # ratios 1.0, 1.5, 0.5 (old = 0, logprobs = ln ratio), A = +1, +1, -1; eps_low 1 (no lower
    # bound), eps_high 0.2 -> weights sg(clip(ratio, 0, 1.2)) = 1.0, 1.2, 0.5.
    # per token -w * A * logp: 0, -1.2 * ln 1.5 = -0.486558, -0.5 * -1 * ln 0.5 = -0.346574
    # token_mean = -0.833132 / 3 = -0.277711; gradient -w * A / 3 = [-1/3, -0.4, +1/6]: the clipped
    # token keeps a (bounded) gradient, unlike PPO where it would be 0.
    logprobs = torch.tensor([[0.0, math.log(1.5), math.log(0.5)]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, m = cispo_policy_loss(logprobs, torch.zeros(1, 3), adv, torch.ones(1, 3), clip_eps=1.0, clip_eps_high=0.2)
    torch.testing.assert_close(loss, torch.tensor((-1.2 * math.log(1.5) + 0.5 * math.log(0.5)) / 3))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -0.4, 1 / 6]]))
    torch.testing.assert_close(m["clipfrac"], torch.tensor(1 / 3))


def test_is_weights_multiply_the_per_token_loss():
    # a2c: -A * logp = [2.0, -1.0]; weights [0.5, 2.0] -> [1.0, -2.0] -> token_mean -0.5
    logprobs = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[2.0, -0.5]])
    loss, _ = a2c_policy_loss(logprobs, adv, torch.ones(1, 2), is_weights=torch.tensor([[0.5, 2.0]]))
    torch.testing.assert_close(loss, torch.tensor(-0.5))
    # ppo on-policy (ratio 1): -A = [-2.0, 0.5] * [0.5, 2.0] = [-1.0, 1.0] -> 0
    loss, _ = ppo_policy_loss(logprobs, logprobs, adv, torch.ones(1, 2), is_weights=torch.tensor([[0.5, 2.0]]))
    torch.testing.assert_close(loss, torch.tensor(0.0))


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
