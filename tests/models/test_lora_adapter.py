"""LoRA adapters served by vLLM (``model.lora.sync=adapter``) on the real engine and learner
(vLLM CPU + DeepSpeed + Ray, without the trainer): the learner streams only the adapter, the
engine keeps the base weights it started with and serves each version as a new LoRA adapter,
and vLLM's logprobs equal the learner's (< 1e-4) after every sync: in the post-sync spot check
and on the tokens it then generates in one call and in chunks (the chunked path of the
actor-learner mode), so every path runs with the current adapter. The base model's logprobs of
the same tokens differ by far more than the tolerance, so an engine that ignored the adapter
(or served the previous version's) fails."""

from __future__ import annotations

import time

import pytest
import torch

from rlhf_ray.batch import pad_samples
from rlhf_ray.config import AlgoConfig, Config, LearnerConfig, LoRAConfig, RolloutConfig, SyncConfig
from rlhf_ray.groups import PolicyGroup, RolloutGroup
from rlhf_ray.models import ensure_tiny_llama, load_causal_lm
from rlhf_ray.placement import RolePlan
from rlhf_ray.runtime import worker_env
from rlhf_ray.sync.coordinator import WeightSync
from rlhf_ray.workers.policy import PolicyWorker
from rlhf_ray.workers.rollout import RolloutWorker

pytestmark = pytest.mark.e2e

LORA = LoRAConfig(rank=8, alpha=16.0, sync="adapter")
ROLLOUT = RolloutConfig(num_engines=1, n_samples_per_prompt=2, max_new_tokens=10, temperature=1.0)
PROMPTS = [[1, 40, 41, 42, 20], [1, 50, 51, 20], [1, 60, 61, 62, 63, 20], [1, 44, 20]]


@pytest.fixture(scope="module")
def groups(ray_cluster, cache_dir):
    # hidden 64, 2 heads of 32: smaller than the default model, still a head size vLLM's CPU attention takes
    model_dir = str(ensure_tiny_llama(cache_dir / "tiny-lora-vllm", hidden_size=64, num_layers=2, num_heads=2))
    env = worker_env(Config())
    rollout = RolloutGroup(RolePlan("rollout", 1, 1.0, 0, "PACK"), RolloutWorker, lambda i, name: dict(
        name=name, model_path=model_dir, cfg=ROLLOUT, max_model_len=64, seed=0, lora=LORA,
    ), namespace="rlhf_ray_tests", timeout_s=300,
        env=dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1"))
    policy = PolicyGroup(RolePlan("policy", 1, 1.0, 0, "PACK"), PolicyWorker, lambda i, name: dict(
        name=name, rank=i, world_size=1, cfg=LearnerConfig(num_ranks=1, micro_batch_size=8, lr=5e-2, zero_stage=2),
        model_path=model_dir, algo=AlgoConfig(epochs=1, minibatches=1), gradient_accumulation_steps=1, lora=LORA,
    ), namespace="rlhf_ray_tests", timeout_s=300, env=env)
    try:
        rollout.ready()
        policy.start()
        yield rollout, policy, model_dir
    finally:
        rollout.shutdown()
        policy.shutdown()


def mean_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).sum() / mask.sum())


def test_adapter_sync_serves_each_version_in_every_generate_path(groups):
    rollout, policy, model_dir = groups
    sync = WeightSync(policy, rollout, SyncConfig(), tensor_parallel_size=1, timeout_s=300, pad_id=0)
    names = [m.name for bucket in sync.plan for m in bucket]
    # only the adapters travel: 2 layers x 7 linear modules x (A, B)
    assert len(names) == 28 and all(".lora_A." in n or ".lora_B." in n for n in names)
    full_bytes = sum(p.numel() * p.element_size() for p in load_causal_lm(model_dir).parameters())
    print(f"\nadapter sync plan {sync.weight_bytes / 1e3:.0f} kB vs full model {full_bytes / 1e3:.0f} kB")
    assert sync.weight_bytes < full_bytes / 5

    samples = rollout.generate(PROMPTS, seed=0, min_version=0)  # v0: the base (B = 0), no adapter yet
    g = torch.Generator().manual_seed(0)
    for version in (1, 2):
        exp = pad_samples(samples, 0)
        exp.old_logprobs = exp.ref_logprobs = policy.compute_logprobs(exp)
        exp.valid = torch.ones(len(exp))
        exp.advantages = torch.randn(exp.response_mask.shape, generator=g) * exp.response_mask
        policy.update(exp, kl_coef=0.0)
        start = time.perf_counter()
        metrics = sync.push(version, check=samples[:4])
        print(f"v{version}: sync {metrics['sync/bytes'] / 1e3:.0f} kB in {metrics['sync/seconds']:.3f}s "
              f"(push {time.perf_counter() - start:.3f}s), check diff {metrics['sync/check_logprob_diff']:.1e}")
        assert metrics["sync/check_logprob_diff"] < 1e-4 and rollout.versions() == [version]

        whole = rollout.generate(PROMPTS, seed=version, min_version=version)
        chunked = rollout.submit_generate(0, PROMPTS, list(range(len(PROMPTS))), seed=version, min_version=version,
                                          chunk_tokens=3).result()
        for path, batch in (("whole", whole), ("chunked", chunked)):
            assert {s.weight_version for s in batch} == {version}
            exp = pad_samples(batch, 0)
            learner = policy.compute_logprobs(exp)
            base = policy.submit_ref_logprobs(exp).result()  # adapters off
            diff, moved = mean_abs(exp.rollout_logprobs, learner, exp.response_mask), \
                mean_abs(base, learner, exp.response_mask)
            print(f"v{version} {path}: |vLLM - learner| {diff:.1e}, |base - learner| {moved:.1e}")
            assert diff < 1e-4, f"v{version} {path}: the engine does not serve the current adapter"
            assert moved > 1e-3  # the adapter changes the policy: the check above can fail
        samples = whole
