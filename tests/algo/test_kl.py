"""Tests for rlhf_ray.algo.kl: estimators, controllers, KL-penalized rewards."""

import math

import pytest
import torch

from rlhf_ray.algo.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalized_rewards,
    last_token_onehot,
)


def test_kl_estimators_by_hand():
    # pi(token) = 1/2, ref(token) = 1/4: logprobs - ref_logprobs = ln 2 = 0.6931.
    logprobs = torch.tensor([[math.log(0.5)]])
    ref_logprobs = torch.tensor([[math.log(0.25)]])
    ln2 = math.log(2.0)
    # k1 = ln 2
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k1"), torch.tensor([[ln2]]))
    # k2 = 0.5 * (ln 2)^2 = 0.2402
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k2"), torch.tensor([[0.5 * ln2**2]]))
    # k3: r = ref / pi = 1/2, k3 = (r - 1) - ln r = -0.5 + ln 2 = 0.1931
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, "k3"), torch.tensor([[ln2 - 0.5]]))
    # Default kind is k1.
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs), torch.tensor([[ln2]]))


def test_k2_k3_nonnegative_and_zero_when_equal():
    torch.manual_seed(0)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    for kind in ("k2", "k3"):
        assert (kl_estimate(a, b, kind) >= 0).all()
    for kind in KL_ESTIMATORS:
        torch.testing.assert_close(kl_estimate(a, a, kind), torch.zeros(4, 6))


def test_k3_clamps_log_ratio_to_avoid_overflow():
    # logprobs - ref = 1000: log r = -1000 clamped to -20 -> k3 = e^-20 - 1 + 20.
    out = kl_estimate(torch.tensor([0.0]), torch.tensor([-1000.0]), "k3")
    torch.testing.assert_close(out, torch.tensor([math.exp(-20) + 19.0]))
    # logprobs - ref = -1000: log r = 1000 clamped to 20 -> k3 = e^20 - 1 - 20, finite.
    out = kl_estimate(torch.tensor([-1000.0]), torch.tensor([0.0]), "k3")
    torch.testing.assert_close(out, torch.tensor([math.exp(20) - 21.0]))


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    # Sample tokens from pi; the sample means of k1 and k3 approach KL(pi || ref).
    gen = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((pi * (pi / ref).log()).sum())  # 0.2749
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=gen)
    logprobs, ref_logprobs = pi.log()[tokens], ref.log()[tokens]
    for kind in ("k1", "k3"):
        assert abs(float(kl_estimate(logprobs, ref_logprobs, kind).mean()) - true_kl) < 0.01


def test_kl_estimate_rejects_unknown_kind_and_shape_mismatch():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(torch.zeros(2, 3), torch.zeros(2, 1))


def test_fixed_controller_never_changes():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_two_updates_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # Update 1: KL 9 -> 9/6 - 1 = 0.5, clipped to 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512.
    ctl.update(current_kl=9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * 1.00512)  # 0.100512
    # Update 2: KL 5.4 -> 5.4/6 - 1 = -0.1 (inside the clip); mult = 1 - 0.1 * 0.0256 = 0.99744.
    ctl.update(current_kl=5.4, n_steps=256)
    assert ctl.value == pytest.approx(0.100512 * 0.99744)  # 0.10025468928
    restored = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_adaptive_controller_validates_arguments():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)


def test_last_token_onehot():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    expected = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, 0]]).bool()
    assert torch.equal(last_token_onehot(mask), expected)


def test_kl_penalized_rewards_by_hand():
    scores = torch.tensor([1.0, -2.0, 5.0])
    ref_logprobs = torch.zeros(3, 3)
    logprobs = torch.tensor([[0.5, -0.5, 1.0], [0.2, 0.4, float("inf")], [0.3, 0.3, 0.3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    # k1 = logprobs - ref; reward = -0.1 * k1, plus the score on the last valid token.
    # row 0: [-0.05, 0.05, -0.1 + 1.0]; row 1: [-0.02, -0.04 - 2.0, 0 (padding, even with inf)];
    # row 2: no valid token -> all zero, the score is dropped.
    expected = torch.tensor([[-0.05, 0.05, 0.9], [-0.02, -2.04, 0.0], [0.0, 0.0, 0.0]])
    out = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(out, expected)


def test_kl_penalized_rewards_uses_kl_estimate_kind():
    torch.manual_seed(0)
    logprobs, ref_logprobs = torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = kl_penalized_rewards(torch.zeros(2), logprobs, ref_logprobs, mask, kl_coef=0.5, kind="k3")
    expected = -0.5 * kl_estimate(logprobs, ref_logprobs, "k3") * mask
    torch.testing.assert_close(out, expected)


def test_kl_penalized_rewards_rejects_bad_score_shape():
    with pytest.raises(ValueError, match="scores"):
        kl_penalized_rewards(torch.zeros(2, 1), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 0.1)
