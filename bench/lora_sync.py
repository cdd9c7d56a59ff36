"""Benchmark: a LoRA policy synced to vLLM as merged weights vs as a vLLM LoRA adapter
(``model.lora.sync``), and the engine's generation speed with and without the LoRA path.
Prints a table; asserts nothing.

    python bench/lora_sync.py                                   # default tiny model, rank 8
    python bench/lora_sync.py --hidden 512 --layers 8 --heads 8 --rank 16 --syncs 5

Per mode one engine and one learner rank (the real vLLM, DeepSpeed and Ray). Each sync follows a
learner update and is timed without the logprob check (``sync/seconds``: learner hand-over to
every engine reporting the version); one last sync with the check reports |vLLM - learner|.
Generation tokens/s: the merged engine (no LoRA support), the adapter engine before its first
sync (LoRA enabled, no adapter requested) and after it (every request runs the adapter).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def tokens_per_s(rollout, prompts: list[list[int]], seed: int) -> float:
    start = time.perf_counter()
    samples = rollout.generate(prompts, seed=seed, min_version=0)
    return sum(len(s.response_ids) for s in samples) / (time.perf_counter() - start)


def run_mode(mode: str, args, model_dir: str) -> dict[str, float]:
    import torch

    from rlhf_ray.batch import pad_samples
    from rlhf_ray.config import AlgoConfig, Config, LearnerConfig, LoRAConfig, RolloutConfig, SyncConfig
    from rlhf_ray.groups import PolicyGroup, RolloutGroup
    from rlhf_ray.placement import RolePlan
    from rlhf_ray.runtime import worker_env
    from rlhf_ray.sync.coordinator import WeightSync
    from rlhf_ray.workers.policy import PolicyWorker
    from rlhf_ray.workers.rollout import RolloutWorker

    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, sync=mode)
    rollout_cfg = RolloutConfig(num_engines=1, n_samples_per_prompt=4, max_new_tokens=args.new_tokens)
    env = worker_env(Config())
    rollout = RolloutGroup(RolePlan("rollout", 1, 1.0, 0, "PACK"), RolloutWorker, lambda i, name: dict(
        name=name, model_path=model_dir, cfg=rollout_cfg, max_model_len=16 + args.new_tokens, seed=0,
        lora=lora if mode == "adapter" else None,
    ), namespace="rlhf_ray_bench", timeout_s=600,
        env=dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1"))
    policy = PolicyGroup(RolePlan("policy", 1, 1.0, 0, "PACK"), PolicyWorker, lambda i, name: dict(
        name=name, rank=i, world_size=1, cfg=LearnerConfig(num_ranks=1, micro_batch_size=8, lr=1e-2, zero_stage=2),
        model_path=model_dir, algo=AlgoConfig(epochs=1, minibatches=1), gradient_accumulation_steps=1, lora=lora,
    ), namespace="rlhf_ray_bench", timeout_s=600, env=env)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(4, 100) for _ in range(8)] for _ in range(args.prompts)]
    out: dict[str, float] = {}
    try:
        rollout.ready()
        policy.start()
        sync = WeightSync(policy, rollout, SyncConfig(), tensor_parallel_size=1, timeout_s=600, pad_id=0)
        tokens_per_s(rollout, prompts[:4], seed=0)  # warm-up
        out["gen_tok_s_before_sync"] = statistics.median(tokens_per_s(rollout, prompts, s) for s in range(3))
        samples = rollout.generate(prompts[:8], seed=0, min_version=0)
        g = torch.Generator().manual_seed(0)
        seconds = []
        for version in range(1, args.syncs + 2):
            exp = pad_samples(samples, 0)
            exp.old_logprobs = exp.ref_logprobs = policy.compute_logprobs(exp)
            exp.valid = torch.ones(len(exp))
            exp.advantages = torch.randn(exp.response_mask.shape, generator=g) * exp.response_mask
            policy.update(exp, kl_coef=0.0)
            last = version == args.syncs + 1
            metrics = sync.push(version, check=samples[:4] if last else ())
            if last:
                out["check_logprob_diff"] = metrics["sync/check_logprob_diff"]
            else:
                seconds.append(metrics["sync/seconds"])
        out.update(sync_bytes=float(sync.weight_bytes), sync_s_median=statistics.median(seconds),
                   sync_s_min=min(seconds), sync_s_max=max(seconds))
        out["gen_tok_s_after_sync"] = statistics.median(
            tokens_per_s(rollout, prompts, s) for s in range(3))
    finally:
        rollout.shutdown()
        policy.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--syncs", type=int, default=5, help="timed syncs per mode")
    p.add_argument("--prompts", type=int, default=32, help="prompts per timed generate (4 samples each)")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--modes", default="merged,adapter")
    args = p.parse_args()

    import ray

    from rlhf_ray.models import build_tiny_llama, load_causal_lm

    model_dir = str(build_tiny_llama(os.path.join(tempfile.mkdtemp(prefix="lora_bench_"), "model"),
                                     hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads))
    n_params = sum(p.numel() for p in load_causal_lm(model_dir).parameters())
    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    try:
        results = {mode: run_mode(mode, args, model_dir) for mode in args.modes.split(",")}
    finally:
        ray.shutdown()
    print(f"\nmodel: hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.2f}M parameters; LoRA rank {args.rank}")
    print(f"{'mode':8} {'sync MB':>9} {'sync s (median, min-max)':>26} {'check diff':>11} "
          f"{'gen tok/s before':>17} {'gen tok/s after':>16}")
    for mode, r in results.items():
        print(f"{mode:8} {r['sync_bytes'] / 1e6:9.3f} {r['sync_s_median']:12.3f} ({r['sync_s_min']:.3f}-{r['sync_s_max']:.3f})"
              f" {r['check_logprob_diff']:11.1e} {r['gen_tok_s_before_sync']:17.0f} {r['gen_tok_s_after_sync']:16.0f}")
    print("(merged: the engine has no LoRA support; adapter: 'before' = LoRA enabled, no adapter yet, "
          "'after' = every request runs the adapter)")


if __name__ == "__main__":
    main()
