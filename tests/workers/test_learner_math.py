"""The learner's update equals the full-minibatch math, on real DeepSpeed ZeRO-2 ranks (Ray
workers): 2 ranks x micro-batches of unequal lengths (fixed or token-budget, with fillers where
ranks have fewer) give the single-rank full-batch gradient, for the policy and the critic; and
an experience without old logprobs (single on-policy pass) gives the same update as one with them.

Gradients are read at the accumulation boundary, before the optimizer step, with DeepSpeed's
``safe_get_full_grad`` (a probe subclass wraps ``engine.step``; the product code is unchanged)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf_ray.batch import RolloutSample, pad_samples
from rlhf_ray.config import AlgoConfig, LearnerConfig
from rlhf_ray.groups import DeepSpeedGroup, PolicyGroup
from rlhf_ray.models import ensure_tiny_llama
from rlhf_ray.placement import RolePlan
from rlhf_ray.workers.critic import CriticWorker
from rlhf_ray.workers.policy import PolicyWorker

pytestmark = pytest.mark.e2e


class GradProbe:
    """Records every parameter's full (all-rank) gradient at each optimizer step."""

    def init(self, master_addr: str, master_port: int) -> None:
        super().init(master_addr, master_port)
        step, self.grads = self.engine.step, []

        def probed(*args, **kwargs):
            if self.engine.is_gradient_accumulation_boundary():
                from deepspeed.utils import safe_get_full_grad

                self.grads.append({n: safe_get_full_grad(p).detach().cpu().clone()
                                   for n, p in self.engine.module.named_parameters()})
            return step(*args, **kwargs)

        self.engine.step = probed

    def last_grads(self) -> dict[str, torch.Tensor]:
        return self.grads[-1]

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.engine.module.named_parameters()}


class ProbePolicy(GradProbe, PolicyWorker):
    pass


class ProbeCritic(GradProbe, CriticWorker):
    pass


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return str(ensure_tiny_llama(cache_dir / "tiny-learner", hidden_size=64, num_layers=2, num_heads=2))


def experience(n: int = 8):
    """8 rows with prompts of 1-6 and responses of 1-7 tokens, one masked row (valid = 0)."""
    g = torch.Generator().manual_seed(3)
    p_lens, a_lens = [1, 6, 3, 2, 5, 1, 4, 2], [7, 1, 4, 2, 6, 3, 1, 5]
    samples = [RolloutSample(i, torch.randint(5, 30, (p,), generator=g).tolist(),
                             torch.randint(5, 30, (a,), generator=g).tolist(), [-1.0] * a, 0, "t")
               for i, (p, a) in enumerate(zip(p_lens[:n], a_lens[:n], strict=True))]
    exp = pad_samples(samples, pad_id=0)
    exp.valid = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    exp.advantages = torch.randn(exp.response_mask.shape, generator=g) * exp.response_mask
    exp.values = torch.randn(exp.response_mask.shape, generator=g) * exp.response_mask
    exp.returns = torch.randn(exp.response_mask.shape, generator=g) * exp.response_mask
    return exp


def groups(tiny: str, *specs: tuple[str, type, int, LearnerConfig, int]) -> list[DeepSpeedGroup]:
    """One started group per ``(role, cls, ranks, cfg, gas)``: all spawned at once, so their
    workers' start-ups overlap, then each one's DeepSpeed world initialised."""
    spawned = []
    try:
        for role, cls, ranks, cfg, gas in specs:
            kind = PolicyGroup if issubclass(cls, PolicyWorker) else DeepSpeedGroup
            spawned.append(kind(RolePlan(role, ranks, 1.0, 0, "PACK"), cls, lambda i, name, ranks=ranks, cfg=cfg, gas=gas: dict(
                name=name, rank=i, world_size=ranks, cfg=cfg, model_path=tiny, algo=AlgoConfig(epochs=1, minibatches=1),
                gradient_accumulation_steps=gas, total_optimizer_steps=4,
            ), namespace="rlhf_ray_tests", timeout_s=600, env={"DS_ACCELERATOR": "cpu"}))
        for g in spawned:
            g.start()
    except BaseException:
        for g in spawned:
            g.shutdown()
        raise
    return spawned


def update(g: DeepSpeedGroup, exp, policy: bool) -> list[dict]:
    shards = exp.split(len(g.workers))
    call = (lambda w, s: w.update.remote(s, 0.0)) if policy else (lambda w, s: w.update.remote(s))
    g.get([call(w, s) for w, s in zip(g.workers, shards, strict=True)], "update")
    return g.get([w.last_grads.remote() for w in g.workers], "grads")


def assert_same_grads(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    scale = max(float(expected[k].abs().max()) for k in got)
    assert scale > 1e-3  # a real gradient
    assert worst < 1e-5, f"max |grad difference| {worst:.2e} (largest gradient {scale:.2e})"


@pytest.mark.parametrize("role_cls", ["policy", "critic"])
def test_two_ranks_of_unequal_micro_batches_give_the_full_batch_gradient(ray_cluster, tiny, role_cls):
    cls = ProbePolicy if role_cls == "policy" else ProbeCritic
    lr = 1e-9  # the step barely moves the weights; we compare gradients
    full_cfg = LearnerConfig(num_ranks=1, micro_batch_size=8, lr=lr)
    dp_cfg = LearnerConfig(num_ranks=2, micro_batch_size=2, lr=lr)
    # budget 24: rank 0 packs its rows into 3 micro-batches, rank 1 into 2 (+ 1 empty filler)
    budget_cfg = LearnerConfig(num_ranks=2, micro_batch_size=2, lr=lr, max_tokens_per_micro_batch=24)
    exp = experience()
    specs = [(f"{role_cls}_full", cls, 1, full_cfg, 1), (f"{role_cls}_dp", cls, 2, dp_cfg, 2)]
    if role_cls == "policy":
        specs.append((f"{role_cls}_budget", cls, 2, budget_cfg, 2))
    full, *dps = groups(tiny, *specs)
    try:
        if role_cls == "policy":
            exp.old_logprobs = full.compute_logprobs(exp) + 0.05 * exp.response_mask  # ratios != 1
        expected = update(full, exp, role_cls == "policy")[0]
        for dp in dps:
            for g in update(dp, exp, role_cls == "policy"):  # every rank sees the same full gradient
                assert_same_grads(g, expected)
    finally:
        for g in (full, *dps):
            g.shutdown()


def test_update_without_old_logprobs_equals_update_with_them(ray_cluster, tiny):
    # Adam's first step is ~lr * sign(grad): a tiny lr keeps float noise in near-zero gradient
    # components (the two old-logprob forwards differ by ~1e-7) from being amplified to 1e-5.
    cfg = LearnerConfig(num_ranks=1, micro_batch_size=4, lr=1e-5)
    exp = experience()
    exp.rollout_logprobs = exp.rollout_logprobs * 0 - 3.0
    with_old, without = groups(tiny, ("policy_old", ProbePolicy, 1, cfg, 2), ("policy_none", ProbePolicy, 1, cfg, 2))
    try:
        before = with_old.get([with_old.workers[0].weights.remote()], "weights")[0]
        computed = replace(exp, old_logprobs=with_old.compute_logprobs(exp))
        m_old = with_old.update(computed, kl_coef=0.0)
        m_none = without.update(replace(exp, old_logprobs=None), kl_coef=0.0)
        a = with_old.get([with_old.workers[0].weights.remote()], "weights")[0]
        b = without.get([without.workers[0].weights.remote()], "weights")[0]
        grads = [g.get([g.workers[0].last_grads.remote()], "grads")[0] for g in (with_old, without)]
    finally:
        with_old.shutdown()
        without.shutdown()
    assert_same_grads(grads[1], grads[0])
    moved = max(float((a[k] - before[k]).abs().max()) for k in a)
    assert moved > 5e-6  # the step really changed the weights (by ~lr)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-6, f"weights differ by {diff:.2e} after one step"
    assert m_none["policy/loss"] == pytest.approx(m_old["policy/loss"], abs=1e-6)
    assert {"rollout/mismatch_kl", "rollout/is_weight_mean", "rollout/is_clipped_frac"} <= m_none.keys()
