"""Micro-batching: token-budget grouping and padding trimming (pure), and on a real (tiny,
in-process) transformers model, trimmed token-budget micro-batches with the global loss
normaliser give the same logprobs, loss and gradient as the padded fixed-size computation."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algo import AGG_MODES, LossNormalizer, ppo_policy_loss
from rlhf_ray.batch import RolloutSample, pad_samples
from rlhf_ray.micro_batches import fixed_groups, micro_batches, token_budget_groups, trim_padding
from rlhf_ray.workers.forward import batched, response_logprobs


def test_token_budget_groups_by_hand():
    # totals 6, 6, 6, 3 (sorted longest first, ties in order). Budget 13: [0] 1x(2+4)=6; adding row 1
    # would be 2x(5+4)=18 -> [1] 1x(5+1)=6; adding 2 -> 2x(5+3)=16 -> [2]; adding 3 -> 2x(3+3)=12 ok.
    assert token_budget_groups([2, 5, 3, 1], [4, 1, 3, 2], 13) == [[0], [1], [2, 3]]
    # Budget 18: [0, 1] = 2x9 = 18; adding 2 -> 3x9 = 27 -> [2, 3] = 2x6 = 12.
    assert token_budget_groups([2, 5, 3, 1], [4, 1, 3, 2], 18) == [[0, 1], [2, 3]]
    assert token_budget_groups([9], [9], 4) == [[0]]  # longer than the budget: alone
    assert fixed_groups(5, 2) == [[0, 1], [2, 3], [4]]
    # The two rank shards of tests/workers/test_learner_math.py at budget 24: 3 vs 2 micro-batches.
    p, a = [1, 6, 3, 2, 5, 1, 4, 2], [7, 1, 4, 2, 6, 3, 1, 5]
    assert token_budget_groups(p[:4], a[:4], 24) == [[0], [1, 2], [3]]
    assert token_budget_groups(p[4:], a[4:], 24) == [[0, 3], [1, 2]]


def samples(prompts: list[list[int]], responses: list[list[int]]) -> list[RolloutSample]:
    return [RolloutSample(i, p, r, [-1.0] * len(r), 0, "e") for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]


def test_trim_padding_keeps_the_layout():
    exp = pad_samples(samples([[5, 6, 7], [8], [9, 10]], [[11, 12, 13, 14], [15], [16, 17]]), pad_id=0)
    exp.valid = torch.ones(3)
    sub = trim_padding(exp.select(torch.tensor([1, 2])))
    # longest prompt 2, longest response 2: [pad 8 | 15 pad] and [9 10 | 16 17]
    assert sub.sequences.tolist() == [[0, 8, 15, 0], [9, 10, 16, 17]]
    assert sub.attention_mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    assert sub.response_mask.tolist() == [[1.0, 0.0], [1.0, 1.0]] and sub.prompt_len == 2
    assert sub.rollout_logprobs.shape == (2, 2) and sub.valid.shape == (2,)
    parts = micro_batches(exp, micro_batch_size=2, max_tokens=0, min_count=3)
    assert [rows for rows, _ in parts] == [[0, 1], [2], []]  # a filler pads to min_count
    assert parts[2][1].valid.tolist() == [0.0]


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ragged_experience():
    g = torch.Generator().manual_seed(1)
    p_lens, a_lens = [1, 6, 3, 2, 5, 1], [7, 1, 4, 2, 6, 3]
    exp = pad_samples(samples([torch.randint(3, 32, (p,), generator=g).tolist() for p in p_lens],
                              [torch.randint(3, 32, (a,), generator=g).tolist() for a in a_lens]), pad_id=0)
    exp.valid = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # one masked row
    exp.advantages = torch.randn(exp.response_mask.shape, generator=g) * exp.response_mask
    exp.old_logprobs = (torch.randn(exp.response_mask.shape, generator=g) * 0.1 - 3.0) * exp.response_mask
    return exp


def test_token_budget_logprobs_equal_the_padded_forward(model):
    exp = ragged_experience()
    A = exp.response_mask.shape[1]
    with torch.no_grad():
        padded = response_logprobs(model, exp.sequences, exp.attention_mask, A)[0] * exp.response_mask

    def fn(seq, mask, a):
        return response_logprobs(model, seq, mask, a)[0]

    budget = batched(fn, exp, micro_batch_size=2, max_tokens=24) * exp.response_mask
    torch.testing.assert_close(budget, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_token_budget_loss_and_gradient_equal_the_padded_computation(model, mode):
    exp = ragged_experience()
    horizon = 8

    def loss_of(batch, norm):
        A = batch.response_mask.shape[1]
        logprobs = response_logprobs(model, batch.sequences, batch.attention_mask, A)[0]
        mask = batch.response_mask * batch.valid[:, None]
        return ppo_policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, agg_mode=mode, norm=norm)[0]

    params = [p for p in model.parameters()]
    full_mask = exp.response_mask * exp.valid[:, None]
    full = loss_of(exp, LossNormalizer.of(full_mask, horizon))
    full_grads = torch.autograd.grad(full, params)
    norm = LossNormalizer.of(full_mask, horizon)
    parts = micro_batches(exp, micro_batch_size=2, max_tokens=24)
    assert len(parts) > 2 and max(mb.sequences.shape[1] for _, mb in parts) < exp.sequences.shape[1]
    total = sum(loss_of(mb, norm) for _, mb in parts)
    grads = torch.autograd.grad(total, params)
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-6)
    for g, f in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, f, rtol=1e-4, atol=1e-6)
