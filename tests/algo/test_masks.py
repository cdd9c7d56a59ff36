"""Tests for rlhf_ray.algo.masks: masked reductions, whitening, loss aggregation."""

import math

import pytest
import torch

from rlhf_ray.algo.masks import (
    AGG_MODES,
    LossNormalizer,
    aggregate_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_by_hand():
    # Valid entries: 1, 2 (row 0) and 4 (row 1).
    torch.testing.assert_close(masked_sum(X, MASK), torch.tensor(7.0))
    torch.testing.assert_close(masked_sum(X, MASK, dim=-1), torch.tensor([3.0, 4.0]))
    # 7 / 3 valid tokens; per row: 3 / 2 = 1.5 and 4 / 1 = 4.
    torch.testing.assert_close(masked_mean(X, MASK), torch.tensor(7.0 / 3.0))
    torch.testing.assert_close(masked_mean(X, MASK, dim=-1), torch.tensor([1.5, 4.0]))
    # Reducing over rows (dim=0): column 0 -> (1 + 4) / 2, column 1 -> 2 / 1, column 2 -> empty -> 0.
    torch.testing.assert_close(masked_mean(X, MASK, dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(masked_mean(X, mask, dim=-1), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(masked_mean(X, torch.zeros_like(MASK)), torch.tensor(0.0))


def test_bool_and_float_masks_agree():
    for mask in (MASK.bool(), MASK.float()):
        torch.testing.assert_close(masked_mean(X, mask), torch.tensor(7.0 / 3.0))


def test_nan_and_inf_in_padding_do_not_leak():
    x = X.clone()
    x[0, 2] = float("nan")
    x[1, 1] = float("-inf")
    torch.testing.assert_close(masked_sum(x, MASK), torch.tensor(7.0))
    torch.testing.assert_close(masked_mean(x, MASK, dim=-1), torch.tensor([1.5, 4.0]))
    assert torch.isfinite(masked_var(x, MASK))
    assert torch.isfinite(masked_whiten(x, MASK)).all()


def test_masked_var_by_hand():
    # Valid values 1, 2, 4: mean 7/3, deviations -4/3, -1/3, 5/3, squares sum 16/9 + 1/9 + 25/9 = 42/9.
    # biased: 42/9 / 3 = 14/9; unbiased: 42/9 / 2 = 7/3.
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(14.0 / 9.0))
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(7.0 / 3.0))
    torch.testing.assert_close(masked_var(x, mask), torch.tensor([1.0, 2.0, 4.0]).var())


def test_masked_var_with_fewer_than_two_elements_is_zero():
    one = torch.tensor([[3.0, 9.0]])
    torch.testing.assert_close(masked_var(one, torch.tensor([[1, 0]])), torch.tensor(0.0))
    torch.testing.assert_close(masked_var(one, torch.tensor([[0, 0]])), torch.tensor(0.0))


def test_masked_whiten_matches_torch_on_valid_entries():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in (7, 3, 1, 5)])
    out = masked_whiten(x, mask)
    valid = x[mask.bool()]
    expected = (valid - valid.mean()) / valid.std()
    torch.testing.assert_close(out[mask.bool()], expected, rtol=1e-5, atol=1e-5)
    assert (out[~mask.bool()] == 0).all()
    # Masked positions do not change the result.
    x2 = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    torch.testing.assert_close(masked_whiten(x2, mask), out)


def test_masked_whiten_without_mean_shift_keeps_mean():
    # Valid 1, 2, 4 (mean 7/3, unbiased std sqrt(7/3)): scale only, then add the mean back.
    x = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    std = math.sqrt(7.0 / 3.0)
    expected = torch.tensor([[(v - 7 / 3) / std + 7 / 3 for v in (1.0, 2.0, 4.0)] + [0.0]])
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), expected)


def test_aggregate_loss_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # third row: no valid token
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    torch.testing.assert_close(aggregate_loss(loss, mask, "token_mean"), torch.tensor(2.5))
    # seq_mean_token_mean: row means 2 and 4 -> (2 + 4) / 2 rows = 3 (empty row left out)
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq_mean_token_mean"), torch.tensor(3.0))
    # seq_mean_token_sum: row sums 6 and 4 -> (6 + 4) / 2 rows = 5
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq_mean_token_sum"), torch.tensor(5.0))
    # seq_mean_token_sum_norm (Dr. GRPO): 10 / (2 rows x horizon); horizon = width 3 -> 10/6, or 5 -> 1
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq_mean_token_sum_norm"), torch.tensor(10 / 6))
    norm = LossNormalizer.of(mask, horizon=5)
    assert (norm.tokens, norm.rows, norm.horizon) == (4.0, 2.0, 5)
    torch.testing.assert_close(aggregate_loss(loss, mask, "seq_mean_token_sum_norm", norm), torch.tensor(1.0))


def _ragged_minibatch():
    """8 rows of unequal lengths (one fully masked: a masked sample), as 2 ranks x 2 micro-batches
    of 2 rows each, the way a learner sees one minibatch."""
    lengths = [5, 1, 3, 0, 2, 6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    torch.manual_seed(0)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(8, 6, dtype=torch.float64)
    return x, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
def test_global_normaliser_makes_micro_batches_and_ranks_add_up_to_the_full_minibatch(mode):
    """The arithmetic of ``DeepSpeedRank._minibatch_step``: every micro-batch's loss is its share
    over the all-reduced counts, scaled by gas x world size because DeepSpeed divides each
    micro-batch loss by gas and averages gradients over ranks. Sum of shares and the accumulated
    gradient equal the single full-minibatch loss and gradient."""
    x, adv, mask = _ragged_minibatch()

    def per_token(rows):
        return -adv[rows] * x[rows] + 0.5 * x[rows] ** 2  # nonlinear in x, like a real loss

    full = aggregate_loss(per_token(slice(None)), mask, mode, LossNormalizer.of(mask, horizon=6))
    (full_grad,) = torch.autograd.grad(full, x)
    world, gas = 2, 2
    ranks = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]  # rank -> micro-batches -> rows
    # all-reduce SUM of each rank's counts over its whole share of the minibatch
    counts = [LossNormalizer.of(mask[sum(r, [])]) for r in ranks]
    norm = LossNormalizer(sum(c.tokens for c in counts), sum(c.rows for c in counts), horizon=6)
    assert (norm.tokens, norm.rows) == (22.0, 7.0)  # 22 tokens; the empty row is not counted
    shares, grad = 0.0, torch.zeros_like(x)
    for rank in ranks:
        for rows in rank:
            share = aggregate_loss(per_token(rows), mask[rows], mode, norm)
            shares = shares + share
            grad += torch.autograd.grad(share * gas * world / gas, x)[0] / world  # what DeepSpeed does
    torch.testing.assert_close(shares, full)
    torch.testing.assert_close(grad, full_grad)
    # The per-micro-batch mean it replaces weighs short micro-batches more: not the full gradient.
    local = sum(aggregate_loss(per_token(rows), mask[rows], mode) for rank in ranks for rows in rank) / 4
    assert (torch.autograd.grad(local, x)[0] - full_grad).abs().max() > 1e-3


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_all_masked_is_zero_and_grad_ignores_padding(mode):
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    out = aggregate_loss(loss, torch.zeros(2, 2), mode)
    torch.testing.assert_close(out, torch.tensor(0.0))
    out = aggregate_loss(loss, torch.tensor([[1, 0], [1, 1]]), mode)
    out.backward()
    assert loss.grad[0, 1] == 0


def test_aggregate_loss_unknown_mode_names_it():
    with pytest.raises(ValueError, match="token_avg"):
        aggregate_loss(X, MASK, "token_avg")
