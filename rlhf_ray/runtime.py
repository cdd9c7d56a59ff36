"""Everything the driver sets up before training: the model and data paths (building the
built-in tiny model and task data when none are given), the Ray connection, and the worker
groups of the resource plan."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from rlhf_ray.config import Config
from rlhf_ray.faults import fault_env
from rlhf_ray.groups import CriticGroup, PolicyGroup, ReferenceGroup, RewardGroup, RolloutGroup
from rlhf_ray.placement import RolePlan, check_fits, format_plan, plan_totals, resource_plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assets:
    policy_path: str
    reference_path: str
    critic_path: str
    train_prompts: str
    eval_prompts: str


def resolve_assets(cfg: Config) -> Assets:
    """Paths of every model and data file; the built-in ones are built on first use."""
    from rlhf_ray.data import ensure_task_data
    from rlhf_ray.models import ensure_tiny_llama

    cache = Path(cfg.model.cache_dir).absolute()
    policy = cfg.model.policy_path
    if not policy:
        t = cfg.model.tiny
        policy = str(ensure_tiny_llama(
            cache / f"tiny-llama-h{t.hidden_size}-l{t.num_layers}-a{t.num_heads}-p{t.max_position_embeddings}-s{cfg.seed}", hidden_size=t.hidden_size,
            num_layers=t.num_layers, num_heads=t.num_heads, max_position_embeddings=t.max_position_embeddings,
            seed=cfg.seed,
        ))
    train, evaluation = cfg.data.train_prompts, cfg.data.eval_prompts
    if not (train and evaluation):
        files = ensure_task_data(cache / f"task-data-s{cfg.data.seed}", seed=cfg.data.seed)
        train, evaluation = train or str(files["prompts_train"]), evaluation or str(files["prompts_eval"])
    return Assets(
        policy_path=str(policy),
        reference_path=cfg.model.reference_path or str(policy),
        critic_path=cfg.model.critic_path or str(policy),
        train_prompts=str(train),
        eval_prompts=str(evaluation),
    )


def connect(cfg: Config, plan: list[RolePlan]) -> bool:
    """Join the cluster at ``cluster.address`` / ``RAY_ADDRESS`` (as under ``ray job submit``),
    or start a local one with enough logical CPUs for the plan. Returns whether a local
    cluster was started here (and so should be shut down by the caller)."""
    c = cfg.cluster
    started = False
    address = c.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        pass  # e.g. tests or a notebook that connected already
    elif address:
        ray.init(address=address, namespace=c.namespace, log_to_driver=True)
    else:
        # Logical CPUs are what Ray schedules by; threads per worker are pinned separately.
        num_cpus = c.num_cpus or max(os.cpu_count() or 1, int(plan_totals(plan)["CPU"] + 0.999))
        ray.init(
            address="local",  # a new cluster, never some other cluster running on this machine
            num_cpus=num_cpus, namespace=c.namespace, include_dashboard=c.include_dashboard,
            dashboard_host="127.0.0.1", object_store_memory=c.object_store_mb * 2**20,
            resources=node_resources(plan) or None,  # cluster.node_resources on one machine
        )
        started = True
    problems = check_fits(plan, ray.cluster_resources(), alive_nodes())
    if problems:
        if started:
            ray.shutdown()
        raise RuntimeError("the resource plan does not fit the cluster:\n" + "\n".join(problems) +
                           "\n" + format_plan(plan))
    return started


def node_resources(plan: list[RolePlan]) -> dict[str, float]:
    """The plan's custom (node-type) resources, e.g. ``{"rollout_node": 2, "learner_node": 5}``."""
    return {k: v for k, v in plan_totals(plan).items() if k not in ("CPU", "GPU")}


def alive_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def dry_run(cfg: Config) -> str:
    """The resource plan; with ``cluster.address`` / ``RAY_ADDRESS`` set, also checked against
    that cluster (connect, compare, disconnect: no worker starts). Raises when it does not fit."""
    plan = resource_plan(cfg)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if not address and not ray.is_initialized():
        return format_plan(plan) + "\n(no cluster.address / RAY_ADDRESS: not checked against a cluster)"
    joined = not ray.is_initialized()
    if joined:
        ray.init(address=address, namespace=cfg.cluster.namespace, log_to_driver=False)
    try:
        nodes, total = alive_nodes(), ray.cluster_resources()
    finally:
        if joined:
            ray.shutdown()
    lines = [format_plan(plan), f"cluster {address or '(connected)'}: {len(nodes)} alive node(s)"]
    for i, node in enumerate(nodes):
        shown = {k: v for k, v in sorted(node.items()) if k in ("CPU", "GPU") or k in plan_totals(plan)}
        lines.append(f"  node {i}: " + ", ".join(f"{k} {v:g}" for k, v in shown.items()))
    problems = check_fits(plan, total, nodes)
    if problems:
        raise RuntimeError("the resource plan does not fit the cluster:\n" + "\n".join(problems + lines))
    return "\n".join(lines + ["the plan fits the cluster"])


@dataclass
class Groups:
    rollout: RolloutGroup
    reward: RewardGroup
    reference: ReferenceGroup
    policy: PolicyGroup
    critic: CriticGroup | None

    def all(self) -> list:
        return [g for g in (self.rollout, self.reward, self.reference, self.policy, self.critic) if g]

    def shutdown(self) -> None:
        for g in self.all():
            g.shutdown()


def worker_env(cfg: Config) -> dict[str, str]:
    threads = str(cfg.cluster.threads_per_worker)
    env = {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false", **fault_env()}
    if cfg.cluster.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", VLLM_CPU_OMP_THREADS_BIND="nobind")
    return env


def build_groups(cfg: Config, assets: Assets) -> Groups:
    """Spawn every role's workers (constructors run in parallel), then wire the DeepSpeed worlds."""
    from rlhf_ray.workers.critic import CriticWorker
    from rlhf_ray.workers.policy import PolicyWorker
    from rlhf_ray.workers.reference import ReferenceWorker
    from rlhf_ray.workers.reward import RewardWorker
    from rlhf_ray.workers.rollout import RolloutWorker

    plan = {r.role: r for r in resource_plan(cfg)}
    c, m = cfg.cluster, cfg.model
    common = dict(namespace=c.namespace, timeout_s=c.call_timeout_s, env=worker_env(cfg))
    env_rollout = dict(common["env"], VLLM_ENABLE_V1_MULTIPROCESSING="0" if cfg.rollout.tensor_parallel_size == 1
                       else "1", VLLM_CPU_KVCACHE_SPACE=str(cfg.rollout.kv_cache_gb))
    max_len = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    rollout = RolloutGroup(plan["rollout"], RolloutWorker, lambda i, name: dict(
        name=name, model_path=assets.policy_path, cfg=cfg.rollout, device=c.device, dtype=m.dtype,
        max_model_len=max_len, seed=cfg.seed + i, trust_remote_code=m.trust_remote_code,
    ), **dict(common, env=env_rollout), max_restarts=3)
    reward = RewardGroup(plan["reward"], RewardWorker, lambda i, name: dict(
        name=name, cfg=cfg.reward, threads=c.threads_per_worker, seed=cfg.seed,
        trust_remote_code=m.trust_remote_code,
    ), **common, max_restarts=3, max_task_retries=3)  # scoring is idempotent: Ray may retry it
    reference = ReferenceGroup(plan["reference"], ReferenceWorker, lambda i, name: dict(
        name=name, model_path=assets.reference_path, device=c.device, dtype=m.dtype,
        micro_batch_size=cfg.policy.micro_batch_size, temperature=cfg.rollout.temperature,
        max_tokens_per_micro_batch=cfg.policy.max_tokens_per_micro_batch,
        threads=c.threads_per_worker, seed=cfg.seed, trust_remote_code=m.trust_remote_code,
    ), **common)
    sequences = cfg.trainer.prompts_per_step * cfg.rollout.n_samples_per_prompt

    def learner_kwargs(lc, path, extra):
        epochs, minibatches = cfg.algo.schedule  # the algorithm table's epoch rule, as the learners run it
        per_rank = sequences // lc.num_ranks
        gas = max(per_rank // minibatches // lc.micro_batch_size, 1)
        return lambda i, name: dict(
            name=name, rank=i, world_size=lc.num_ranks, cfg=lc, model_path=path, device=c.device, dtype=m.dtype,
            seed=cfg.seed, threads=c.threads_per_worker, gradient_accumulation_steps=gas,
            total_optimizer_steps=cfg.trainer.total_steps * epochs * minibatches,
            trust_remote_code=m.trust_remote_code, loss_horizon=cfg.rollout.max_new_tokens, **extra,
        )

    policy = PolicyGroup(plan["policy"], PolicyWorker, learner_kwargs(
        cfg.policy, assets.policy_path, dict(algo=cfg.algo, temperature=cfg.rollout.temperature,
                                             max_staleness=cfg.trainer.max_staleness)), **common)
    critic = None
    if cfg.algo.needs_critic:
        critic = CriticGroup(plan["critic"], CriticWorker, learner_kwargs(
            cfg.critic, assets.critic_path, dict(algo=cfg.algo)), **common)
    groups = Groups(rollout, reward, reference, policy, critic)
    for g in groups.all():
        g.ready()
    policy.init_world()
    if critic:
        critic.init_world()
    log.info("worker groups ready:\n%s", format_plan(list(plan.values())))
    return groups
