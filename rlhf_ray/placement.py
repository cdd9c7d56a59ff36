"""The resource plan: how many workers each role has, what each reserves, and how Ray places
them. One code path for CPU and GPU: only the resolved numbers differ (``num_cpus`` on CPU,
``num_gpus`` + a CPU on GPU)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.config import Config


@dataclass(frozen=True)
class RolePlan:
    role: str  # rollout | reward | reference | policy | critic
    workers: int  # workers of this role (one bundle each)
    cpus: float  # logical CPUs per worker
    gpus: float  # GPUs per worker
    strategy: str  # placement-group strategy of the role's bundles

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


def resource_plan(cfg: Config) -> list[RolePlan]:
    c = cfg.cluster
    gpu = c.device == "cuda"
    cpus = c.cpus_per_worker
    strategy = c.placement_strategy
    plan = [
        RolePlan("rollout", cfg.rollout.num_engines, cpus, cfg.rollout.tensor_parallel_size if gpu else 0, strategy),
        RolePlan("reward", cfg.reward.num_workers, cpus, 1 if gpu and cfg.reward.kind == "model" else 0, strategy),
        RolePlan("reference", 1, cpus, 1 if gpu else 0, strategy),
        RolePlan("policy", cfg.policy.num_ranks, cpus, 1 if gpu else 0, strategy),
    ]
    if cfg.algo.needs_critic:
        plan.append(RolePlan("critic", cfg.critic.num_ranks, cpus, 1 if gpu else 0, strategy))
    return plan


def plan_totals(plan: list[RolePlan]) -> dict[str, float]:
    return {
        "CPU": sum(r.workers * r.cpus for r in plan),
        "GPU": sum(r.workers * r.gpus for r in plan),
    }


def format_plan(plan: list[RolePlan]) -> str:
    lines = [f"{'role':<10} {'workers':>7} {'CPU/worker':>10} {'GPU/worker':>10}  strategy"]
    for r in plan:
        lines.append(f"{r.role:<10} {r.workers:>7} {r.cpus:>10g} {r.gpus:>10g}  {r.strategy}")
    t = plan_totals(plan)
    lines.append(f"{'total':<10} {sum(r.workers for r in plan):>7} {t['CPU']:>10g} {t['GPU']:>10g}")
    return "\n".join(lines)


def check_fits(plan: list[RolePlan], available: dict[str, float]) -> list[str]:
    """Problems placing ``plan`` on a cluster with ``available`` resources (empty when it fits)."""
    need = plan_totals(plan)
    return [
        f"cluster: the plan needs {need[k]:g} {k} but the cluster has {available.get(k, 0):g}"
        for k in ("CPU", "GPU")
        if need[k] > available.get(k, 0) + 1e-9
    ]
