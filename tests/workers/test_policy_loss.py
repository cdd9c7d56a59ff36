"""The policy worker's loss for every algorithm of the table, in-process (no Ray, no DeepSpeed:
a tiny transformers model stands in for the engine's module): the table's loss is used, the
loss is finite and differentiable, metrics are namespaced as agreed."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algo import LossNormalizer
from rlhf_ray.algorithms import ALGORITHMS
from rlhf_ray.config import AlgoConfig, LearnerConfig
from rlhf_ray.workers.policy import PolicyWorker
from tests.test_micro_batches import ragged_experience


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def worker(model, algo: AlgoConfig, max_staleness: int = 0) -> PolicyWorker:
    w = PolicyWorker("policy-0", 0, 1, LearnerConfig(num_ranks=1), "unused", algo=algo, max_staleness=max_staleness)
    w.engine = model
    return w


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_loss_is_finite_and_differentiable(model, name):
    exp = ragged_experience()
    exp.ref_logprobs = exp.old_logprobs - 0.1 * exp.response_mask
    epochs, minibatches = (1, 1) if ALGORITHMS[name].single_pass else (2, 2)
    algo = AlgoConfig(name=name, kl_in_reward=False, kl_estimator="k2", epochs=epochs, minibatches=minibatches)
    w = worker(model, algo, max_staleness=1)
    assert w.off_policy == "tis"  # auto with stale samples
    norm = LossNormalizer.of(exp.response_mask * exp.valid[:, None], horizon=8)
    loss, metrics = w._loss(exp, norm, kl_coef=0.1)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()
    assert {"pg_loss", "entropy", "kl_loss", "rollout/mismatch_kl", "rollout/is_weight_mean",
            "rollout/is_clipped_frac"} <= metrics.keys()


def test_policy_losses_differ_where_the_table_says_they_do(model):
    exp = ragged_experience()
    norm = LossNormalizer.of(exp.response_mask * exp.valid[:, None], horizon=8)
    losses = {name: float(worker(model, AlgoConfig(name=name, clip_eps=0.2, clip_eps_high=0.28))._loss(exp, norm, 0.0)[0].detach())
              for name in ("ppo", "gspo", "cispo", "dapo")}
    # ppo and dapo share the clipped loss (dapo's clip-higher changes only clipped tokens); gspo and
    # cispo are different objectives on the same batch.
    assert len({round(v, 6) for v in (losses["ppo"], losses["gspo"], losses["cispo"])}) == 3


def test_single_pass_without_old_logprobs_is_refused_for_several_minibatches(model):
    exp = ragged_experience()
    exp.old_logprobs = None
    with pytest.raises(ValueError, match="algo.epochs/algo.minibatches"):
        worker(model, AlgoConfig(name="ppo", epochs=2, minibatches=1)).update(exp, kl_coef=0.0)
