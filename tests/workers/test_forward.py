"""The shared-prompt inference forward (``forward.shared_prompt_logits``, used by the reference
worker): each distinct prompt runs once and its samples' responses run on its key/value cache.
The logprobs equal the full padded forward's on every architecture the stack supports, and with
sliding-window attention (in process, tiny random models: no Ray, vLLM or DeepSpeed)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from rlhf_ray.batch import RolloutSample, pad_samples
from rlhf_ray.micro_batches import plan
from rlhf_ray.workers.forward import batched, response_logprobs, shared_prompt_logits
from tests.models.architectures import architecture_configs

# every supported architecture (tests/models/architectures.py), smaller, and two with sliding-window attention
COMMON = dict(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHITECTURES = {
    **architecture_configs(**COMMON),
    # sliding-window caches keep only the last 3 keys (the prompts are longer): every layer, and
    # Gemma 2's alternating sliding/global layers
    "mistral_window": lambda: T.MistralConfig(num_key_value_heads=1, head_dim=32, sliding_window=3, **COMMON),
    "gemma2_window": lambda: T.Gemma2Config(num_key_value_heads=1, head_dim=32, sliding_window=3, **COMMON),
}


def grouped_experience(samples_per_prompt: int = 3):
    """Prompts of different lengths (one holding the pad id 0 inside, one a single token), each
    with ``samples_per_prompt`` responses of different lengths (1 to 7 tokens)."""
    g = torch.Generator().manual_seed(3)
    prompts = [[5, 9, 0, 7], [11], [4, 4, 4, 4, 4, 6], [5, 9, 7]]
    rows = []
    for i, prompt in enumerate(prompts):
        for j in range(samples_per_prompt):
            a = 1 + (i * samples_per_prompt + j) % 7
            response = torch.randint(3, 40, (a,), generator=g).tolist()
            rows.append(RolloutSample(i, prompt, response, [0.0] * a, 0, "engine-0"))
    return pad_samples(rows, pad_id=0)


class CountingModel(torch.nn.Module):
    """The model, counting its forward calls and the input tokens they ran."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.tokens = model, 0, 0

    def forward(self, **kwargs):
        self.calls += 1
        self.tokens += kwargs["input_ids"].numel()
        return self.model(**kwargs)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shared_prompt_logprobs_equal_the_full_forward(arch):
    torch.manual_seed(0)
    model = CountingModel(T.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]()).eval())
    exp = grouped_experience()
    A = exp.response_mask.shape[1]
    with torch.no_grad():
        full = response_logprobs(model, exp.sequences, exp.attention_mask, A)[0] * exp.response_mask
        model.calls = model.tokens = 0
        shared = response_logprobs(model, exp.sequences, exp.attention_mask, A, share_prompts=True)[0]
    # two calls: the 4 distinct prompts (P = 6 columns), then the 12 responses (A - 1 columns each)
    assert (model.calls, model.tokens) == (2, 4 * 6 + 12 * (A - 1))
    torch.testing.assert_close(shared * exp.response_mask, full, rtol=1e-5, atol=1e-5)


def test_shared_prompts_in_token_budget_micro_batches():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(ARCHITECTURES["llama"]()).eval()
    exp = grouped_experience(samples_per_prompt=4)
    A = exp.response_mask.shape[1]
    with torch.no_grad():
        full = response_logprobs(model, exp.sequences, exp.attention_mask, A)[0] * exp.response_mask

    def fn(seq, mask, a):
        return response_logprobs(model, seq, mask, a, share_prompts=True)[0]

    # length-sorted micro-batches split some prompts' samples apart: each shares what it holds
    groups = plan(exp, 4, max_tokens=40)
    assert len(groups) > 1 and any(len({r // 4 for r in g}) < len(g) for g in groups)
    torch.testing.assert_close(batched(fn, exp, 4, max_tokens=40) * exp.response_mask, full, rtol=1e-5, atol=1e-5)


def test_full_forward_where_nothing_is_shared_or_no_cache_is_kept():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(ARCHITECTURES["llama"]()).eval()
    one_each = grouped_experience(samples_per_prompt=1)
    grouped = grouped_experience()
    A = grouped.response_mask.shape[1]
    with torch.no_grad():
        assert shared_prompt_logits(model, one_each.sequences, one_each.attention_mask,
                                    one_each.response_mask.shape[1]) is None
        # a model whose output has no Hugging Face Cache: the full forward
        no_cache = lambda **kwargs: T.modeling_outputs.CausalLMOutput(logits=model(**kwargs).logits)  # noqa: E731
        assert shared_prompt_logits(no_cache, grouped.sequences, grouped.attention_mask, A) is None


def test_shared_prompt_training_forward_gives_the_full_forwards_loss_and_gradient():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(ARCHITECTURES["llama"]()).train()
    exp = grouped_experience()
    A = exp.response_mask.shape[1]
    params = list(model.parameters())

    def loss_and_grads(share):
        logprobs, entropy = response_logprobs(model, exp.sequences, exp.attention_mask, A, with_entropy=True,
                                              share_prompts=share)
        loss = -(logprobs * exp.response_mask).sum() / exp.response_mask.sum()
        return loss, torch.autograd.grad(loss, params)

    full, full_grads = loss_and_grads(False)
    shared, shared_grads = loss_and_grads(True)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(shared_grads, full_grads, strict=True):  # the embeddings' too: prompt tokens count once per sample
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def classifier_config(arch: str):
    config = ARCHITECTURES[arch]()
    config.num_labels = 1
    return config


def ranking_rows(k: int = 4):
    """Rankings as the reward model's batches hold them: ``prompt + completion`` right-padded,
    ``k`` rows per ranking; prompts of different lengths (one of a single token), completions of
    1 to 6 tokens, one pair of completions that agree on their first token (a longer common prefix)."""
    g = torch.Generator().manual_seed(5)
    prompts = [[5, 9, 7, 7], [11], [4, 4, 4, 4, 4, 6]]
    rows = []
    for i, prompt in enumerate(prompts):
        first = torch.randint(3, 40, (1,), generator=g).tolist()
        for j in range(k):
            tail = torch.randint(3, 40, (1 + (i * k + j) % 6,), generator=g).tolist()
            rows.append(prompt + (first + tail if j < 2 else tail))
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, (ids != 0).long() * (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gemma2_window"])
def test_shared_prefix_scores_equal_the_classifiers_own_forward_with_gradient(arch):
    from rlhf_ray.workers.forward import shared_prefix_scores

    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_config(classifier_config(arch)).eval()
    ids, mask = ranking_rows()
    full = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    full.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    counted = CountingModel(model.base_model)
    model_view = type("RM", (), {"base_model": counted, "score": model.score})()
    shared = shared_prefix_scores(model_view, ids, mask, k=4)
    assert counted.calls == 2 and counted.tokens < ids.numel() * 0.75  # the prompts ran once
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-4)
    shared.square().sum().backward()
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_shared_prefix_scores_fall_back_when_a_ranking_shares_nothing():
    from rlhf_ray.workers.forward import shared_prefix_scores

    model = T.AutoModelForSequenceClassification.from_config(classifier_config("llama"))
    ids = torch.tensor([[5, 6, 7], [8, 6, 0]])  # different first tokens
    assert shared_prefix_scores(model, ids, (ids != 0).long(), k=2) is None
