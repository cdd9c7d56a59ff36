"""The DeepSpeed learner group on CPU: 2 ZeRO ranks as Ray workers form one gloo world, train
a step in lockstep, and stay identical; workers can be built without Ray."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.batch import RolloutSample, pad_samples
from rlhf_ray.config import AlgoConfig, LearnerConfig
from rlhf_ray.groups import PolicyGroup
from rlhf_ray.models import ensure_tiny_llama
from rlhf_ray.placement import RolePlan
from rlhf_ray.workers.critic import CriticWorker
from rlhf_ray.workers.policy import PolicyWorker


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return str(ensure_tiny_llama(cache_dir / "tiny-learner", hidden_size=64, num_layers=2, num_heads=2))


def experience(n: int = 8):
    g = torch.Generator().manual_seed(0)
    samples = [
        RolloutSample(i, torch.randint(5, 30, (3 + i % 3,), generator=g).tolist(),
                      torch.randint(5, 30, (4 + i % 2,), generator=g).tolist(), [-1.0] * (4 + i % 2), 0, "t")
        for i in range(n)
    ]
    exp = pad_samples(samples, pad_id=0)
    exp.valid = torch.ones(n)
    exp.advantages = torch.randn(exp.response_mask.shape, generator=g) * exp.response_mask
    return exp


def test_workers_build_without_ray(tiny):
    cfg = LearnerConfig(num_ranks=1)
    w = PolicyWorker("policy-0", 0, 1, cfg, tiny, algo=AlgoConfig())
    c = CriticWorker("critic-0", 0, 1, cfg, tiny, algo=AlgoConfig())
    assert "rank 0/1" in repr(w) and w.engine is None and c.role == "critic"


def two_policy_ranks(cfg: LearnerConfig, tiny: str, **worker_kwargs) -> PolicyGroup:
    """Two PolicyWorker ranks (one epoch, one minibatch) with their DeepSpeed world wired."""
    algo = AlgoConfig(epochs=1, minibatches=1)
    group = PolicyGroup(RolePlan("policy", 2, 1.0, 0, "PACK"), PolicyWorker, lambda i, name: dict(
        name=name, rank=i, world_size=2, cfg=cfg, model_path=tiny, algo=algo, **worker_kwargs,
    ), namespace="rlhf_ray_tests", timeout_s=300, env={"DS_ACCELERATOR": "cpu"})
    try:
        group.start()  # placed, constructed, DeepSpeed world wired
    except BaseException:
        group.shutdown()
        raise
    return group


@pytest.mark.e2e
@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (2, True)])
def test_two_zero_ranks_train_in_lockstep(ray_cluster, tiny, stage, offload):
    cfg = LearnerConfig(num_ranks=2, zero_stage=stage, offload=offload, micro_batch_size=2, lr=1e-2)
    group = two_policy_ranks(cfg, tiny, gradient_accumulation_steps=2, total_optimizer_steps=4)
    try:
        exp = experience()
        exp.old_logprobs = group.compute_logprobs(exp)
        before = group.checksum()
        metrics = group.update(exp, kl_coef=0.0)
        after = group.checksum()
        assert after != before
        assert {"policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/grad_norm"} <= metrics.keys()
        # both ranks hold the same weights after the step (checksums per rank)
        sums = group.get([w.parameter_checksum.remote() for w in group.workers], "checksum")
        assert sums[0] == pytest.approx(sums[1], rel=1e-9)
        # logprobs of the replicated small batch agree across the two ranks
        lp = group.get([w.compute_logprobs.remote(exp.select(slice(0, 2))) for w in group.workers], "lp")
        assert torch.allclose(lp[0], lp[1])
    finally:
        group.shutdown()


@pytest.mark.e2e
def test_nonfinite_gradient_skips_the_step_on_every_rank(ray_cluster, tiny):
    cfg = LearnerConfig(num_ranks=2, zero_stage=2, micro_batch_size=4, lr=1e-2)
    group = two_policy_ranks(cfg, tiny, gradient_accumulation_steps=1)
    try:
        exp = experience()
        exp.old_logprobs = group.compute_logprobs(exp)
        exp.advantages[6, 0] = float("nan")  # only rank 1's shard (rows 4..7) is poisoned
        before = group.get([w.parameter_checksum.remote() for w in group.workers], "checksum")
        metrics = group.update(exp, kl_coef=0.0)
        after = group.get([w.parameter_checksum.remote() for w in group.workers], "checksum")
        assert after == before  # neither rank stepped
        assert metrics["policy/nonfinite_steps"] == 1.0
    finally:
        group.shutdown()


@pytest.mark.e2e
def test_skipped_old_logprob_pass_gives_the_same_update(ray_cluster, tiny, tmp_path):
    """One epoch, one minibatch, on-policy: ``old_logprobs=None`` (the loss takes its own
    detached forward as the old policy) updates exactly as computing the old-logprob pass."""
    cfg = LearnerConfig(num_ranks=2, zero_stage=2, micro_batch_size=2, lr=1e-2)
    group = two_policy_ranks(cfg, tiny, gradient_accumulation_steps=2, total_optimizer_steps=4)
    try:
        group.save_checkpoint(str(tmp_path / "start"))
        start = group.checksum()
        exp = experience()
        exp.old_logprobs = group.compute_logprobs(exp)
        computed = group.update(exp, kl_coef=0.0)
        after_computed = group.checksum()
        group.load_checkpoint(str(tmp_path / "start"))
        exp.old_logprobs = None
        skipped = group.update(exp, kl_coef=0.0)
        # the same change of the weights (the sum moves by the update; equal to float rounding)
        assert group.checksum() - start == pytest.approx(after_computed - start, rel=1e-4)
        assert after_computed != start
        for k in ("policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/grad_norm"):
            assert skipped[k] == pytest.approx(computed[k], rel=1e-5, abs=1e-7), k
    finally:
        group.shutdown()
