"""Tests for rlhf_ray.algo.off_policy: TIS / MIS weights and their statistics, by hand."""

import math

import pytest
import torch

from rlhf_ray.algo.masks import LossNormalizer
from rlhf_ray.algo.off_policy import importance_weights, resolve_off_policy_mode

# Behaviour (vLLM) logprobs 0; learner old logprobs ln 1, ln 3, ln 0.5 -> weights pi_old / mu = 1, 3, 0.5.
# A padding token with a junk weight (e^10) must not count anywhere.
OLD = torch.tensor([[0.0, math.log(3.0), math.log(0.5), 10.0]])
MU = torch.zeros(1, 4)
MASK = torch.tensor([[1, 1, 1, 0]])


def test_tis_truncates_and_reports_statistics():
    w, m = importance_weights(OLD, MU, MASK, "tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.5, 0.0]]))
    # mismatch_kl = mean(w - 1 - ln w) = (0 + (2 - ln 3) + (-0.5 + ln 2)) / 3 = 0.364848
    expected_kl = ((3 - 1 - math.log(3)) + (0.5 - 1 - math.log(0.5))) / 3
    torch.testing.assert_close(m["rollout/mismatch_kl"], torch.tensor(expected_kl))
    torch.testing.assert_close(m["rollout/is_weight_mean"], torch.tensor(1.5))  # (1 + 3 + 0.5) / 3, raw
    torch.testing.assert_close(m["rollout/is_clipped_frac"], torch.tensor(1 / 3))  # the weight 3 > cap


def test_mis_masks_tokens_over_the_cap():
    w, _ = importance_weights(OLD, MU, MASK, "mis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.5, 0.0]]))


def test_sequence_level_weights():
    # One weight per row: exp(ln 1 + ln 3 + ln 0.5) = 1.5 <= cap 2 on every valid token (TIS and MIS);
    # with cap 1.2 TIS truncates to 1.2 and MIS drops the whole row.
    w, m = importance_weights(OLD, MU, MASK, "tis", cap=2.0, level="sequence")
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.5, 1.5, 0.0]]))
    torch.testing.assert_close(m["rollout/is_weight_mean"], torch.tensor(1.5))
    w, _ = importance_weights(OLD, MU, MASK, "tis", cap=1.2, level="sequence")
    torch.testing.assert_close(w, torch.tensor([[1.2, 1.2, 1.2, 0.0]]))
    w, m = importance_weights(OLD, MU, MASK, "mis", cap=1.2, level="sequence")
    torch.testing.assert_close(w, torch.zeros(1, 4))
    torch.testing.assert_close(m["rollout/is_clipped_frac"], torch.tensor(1.0))


def test_none_gives_no_weights_but_statistics_and_shares_with_a_normaliser():
    w, m = importance_weights(OLD, MU, MASK, "none", cap=2.0)
    assert w is None
    # As one of two micro-batches of a minibatch with 6 valid tokens: the share is sum / 6.
    _, share = importance_weights(OLD, MU, MASK, "none", cap=2.0, norm=LossNormalizer(6.0, 2.0))
    torch.testing.assert_close(share["rollout/is_weight_mean"], torch.tensor(4.5 / 6))
    with pytest.raises(ValueError, match="bogus"):
        importance_weights(OLD, MU, MASK, "bogus", cap=2.0)


def test_auto_is_tis_only_when_samples_may_be_stale():
    assert resolve_off_policy_mode("auto", 0) == "none"
    assert resolve_off_policy_mode("auto", 1) == "tis"
    assert resolve_off_policy_mode("mis", 0) == "mis"
