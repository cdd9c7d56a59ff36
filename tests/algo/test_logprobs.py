"""Tests for rlhf_ray.algo.logprobs."""

import math

import torch

from rlhf_ray.algo.logprobs import entropy_from_logits, logprobs_from_logits


def test_logprobs_by_hand():
    # logits (0, ln 3) -> softmax (1/4, 3/4); label 1 -> ln(3/4), label 0 -> ln(1/4).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(0.75), math.log(0.25)]])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)


def test_logprobs_match_log_softmax_gather_and_are_float32():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    labels = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)
    out = logprobs_from_logits(logits.bfloat16(), labels)
    assert out.dtype == torch.float32 and out.shape == (3, 5)


def test_logprobs_stable_for_large_logits():
    logits = torch.tensor([[[1e4, 0.0, -1e4]]])
    out = logprobs_from_logits(logits, torch.tensor([[0]]))
    torch.testing.assert_close(out, torch.tensor([[0.0]]))


def test_entropy_by_hand():
    # p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623...
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[expected]]))
    # Uniform over v tokens: H = ln v; a one-hot-like distribution: H ~ 0.
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    peaked = entropy_from_logits(torch.tensor([[[1e4, 0.0, 0.0]]]))
    torch.testing.assert_close(peaked, torch.tensor([[0.0]]))


def test_entropy_matches_distribution_entropy():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 9)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
