"""The resource plan: how many workers each role has, what each reserves, and how Ray places
them. One code path for CPU and GPU: only the resolved numbers differ (``num_cpus`` on CPU,
``num_gpus`` + a CPU on GPU).

With ``cluster.node_resources=true`` every bundle also asks for one unit of its role's node
resource (``ROLE_NODE_RESOURCE``): nodes that advertise ``rollout_node`` host the vLLM engines,
nodes that advertise ``learner_node`` host the learner, critic, reference and reward workers.
A node advertises as many units as workers it should take (the cluster YAMLs under
``cluster/`` and ``deploy/`` set them); this is how roles land on different node types."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.config import Config

ROLE_NODE_RESOURCE = {
    "rollout": "rollout_node",
    "reward": "learner_node",
    "reference": "learner_node",
    "policy": "learner_node",
    "critic": "learner_node",
    "reward_model": "learner_node",
}


@dataclass(frozen=True)
class RolePlan:
    role: str  # rollout | reward | reference | policy | critic | reward_model (feedback loop)
    workers: int  # workers of this role (one bundle each)
    cpus: float  # logical CPUs per worker
    gpus: float  # GPUs per worker
    strategy: str  # placement-group strategy of the role's bundles
    node_resource: str = ""  # custom resource (1 unit per worker) pinning the role to a node type

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}),
                **({self.node_resource: 1.0} if self.node_resource else {})}


def resource_plan(cfg: Config) -> list[RolePlan]:
    c = cfg.cluster
    gpu = c.device == "cuda"
    cpus = c.cpus_per_worker
    strategy = c.placement_strategy

    def role(name: str, workers: int, gpus: float) -> RolePlan:
        return RolePlan(name, workers, cpus, gpus, strategy, ROLE_NODE_RESOURCE[name] if c.node_resources else "")

    plan = [
        role("rollout", cfg.rollout.num_engines, cfg.rollout.tensor_parallel_size if gpu else 0),
        role("reward", cfg.reward.num_workers, 1 if gpu and cfg.reward.kind == "model" else 0),
        role("policy", cfg.policy.num_ranks, 1 if gpu else 0),
    ]
    if not cfg.model.lora.rank:  # with LoRA the policy ranks serve the reference (adapters off)
        plan.insert(2, role("reference", 1, 1 if gpu else 0))
    if cfg.algo.needs_critic:
        plan.append(role("critic", cfg.critic.num_ranks, 1 if gpu else 0))
    if cfg.feedback.enabled:  # the reward model's DeepSpeed group, retrained during the run
        plan.append(role("reward_model", cfg.feedback.learner.num_ranks, 1 if gpu else 0))
    return plan


def plan_totals(plan: list[RolePlan]) -> dict[str, float]:
    """Every resource the plan reserves: CPU and GPU always, plus any node resources."""
    totals = {"CPU": 0.0, "GPU": 0.0}
    for r in plan:
        for k, v in r.bundle().items():
            totals[k] = totals.get(k, 0.0) + r.workers * v
    return totals


def format_plan(plan: list[RolePlan]) -> str:
    lines = [f"{'role':<10} {'workers':>7} {'CPU/worker':>10} {'GPU/worker':>10}  {'strategy':<13} bundle"]
    for r in plan:
        bundle = ", ".join(f"{k}: {v:g}" for k, v in r.bundle().items())
        lines.append(f"{r.role:<10} {r.workers:>7} {r.cpus:>10g} {r.gpus:>10g}  {r.strategy:<13} "
                     f"{r.workers} x {{{bundle}}}")
    t = plan_totals(plan)
    extra = ", ".join(f"{k}: {v:g}" for k, v in t.items() if k not in ("CPU", "GPU"))
    lines.append(f"{'total':<10} {sum(r.workers for r in plan):>7} {t['CPU']:>10g} {t['GPU']:>10g}"
                 + (f"  {'':<13} {extra}" if extra else ""))
    return "\n".join(lines)


def check_fits(plan: list[RolePlan], available: dict[str, float],
               nodes: list[dict[str, float]] | None = None) -> list[str]:
    """Problems placing ``plan`` on a cluster with ``available`` resources in total and, when
    given, these ``nodes`` (each node's resources; every bundle must fit on one node)."""
    problems = [
        f"cluster: the plan needs {v:g} {k} but the cluster has {available.get(k, 0):g}"
        for k, v in plan_totals(plan).items()
        if v > available.get(k, 0) + 1e-9
    ]
    for r in plan if nodes else []:
        if not any(all(node.get(k, 0) + 1e-9 >= v for k, v in r.bundle().items()) for node in nodes):
            problems.append(f"cluster: no node can hold one {r.role} bundle {r.bundle()}")
    return problems
