"""Everything a driver sets up before it works: the model and data paths (building the
built-in tiny model and task data when none are given), the Ray connection and the run
directory (one function each, used by every entry point), how user errors are reported, and
the worker groups of the resource plan."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from rlhf_ray.config import ClusterConfig, Config
from rlhf_ray.faults import fault_env
from rlhf_ray.groups import CriticGroup, PolicyGroup, ReferenceGroup, RewardGroup, RolloutGroup, start_all
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
    from rlhf_ray.data.generate import task_data_dir
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
        files = ensure_task_data(task_data_dir(cache, cfg.data.seed), seed=cfg.data.seed)
        train, evaluation = train or str(files["prompts_train"]), evaluation or str(files["prompts_eval"])
    return Assets(
        policy_path=str(policy),
        reference_path=cfg.model.reference_path or str(policy),
        critic_path=cfg.model.critic_path or str(policy),
        train_prompts=str(train),
        eval_prompts=str(evaluation),
    )


def connect(cluster: ClusterConfig, *plans: list[RolePlan]) -> bool:
    """The one way every entry point (train, sft, reward_model, evaluate, pipeline) joins Ray.

    Join the cluster at ``cluster.address`` / ``RAY_ADDRESS`` (as under ``ray job submit``), or
    start a new local one (``address="local"``: never attach to some other cluster running on
    this machine) with enough logical CPUs and node resources for the largest of ``plans``
    (stages that run one after the other, like the pipeline's, each pass their plan). A
    connection made earlier (tests, a notebook, the pipeline) is used as it is. Every plan must
    fit the cluster. Returns whether a local cluster was started here (the caller shuts it down)."""
    started = False
    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        pass
    elif address:
        ray.init(address=address, namespace=cluster.namespace, log_to_driver=True)
    else:
        # Logical CPUs are what Ray schedules by; threads per worker are pinned separately.
        need = max((plan_totals(p)["CPU"] for p in plans), default=0.0)
        resources: dict[str, float] = {}
        for p in plans:  # cluster.node_resources on one machine
            for k, v in node_resources(p).items():
                resources[k] = max(resources.get(k, 0.0), v)
        ray.init(
            address="local", num_cpus=cluster.num_cpus or max(os.cpu_count() or 1, int(need + 0.999)),
            namespace=cluster.namespace, include_dashboard=cluster.include_dashboard, dashboard_host="127.0.0.1",
            object_store_memory=cluster.object_store_mb * 2**20, resources=resources or None,
        )
        started = True
    problems = [p for plan in plans for p in check_fits(plan, ray.cluster_resources(), alive_nodes())]
    if problems:
        if started:
            ray.shutdown()
        raise RuntimeError("the resource plan does not fit the cluster:\n" + "\n".join(problems) + "\n"
                           + "\n".join(format_plan(p) for p in plans))
    return started


def run_dir(configured: str) -> Path:
    """The one place a run directory is chosen (every entry point): ``configured`` (e.g.
    ``trainer.output_dir``), else Hydra's output dir (``hydra.sweep.dir/<job num>`` under ``-m``),
    else ``outputs/run``. In a multirun an explicit directory gets the job number appended, so
    that the jobs of a sweep do not share one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from rlhf_ray.storage import is_uri

    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    if configured and not is_uri(configured):  # a URI (s3://...): staged in Hydra's dir, uploaded
        multirun = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
        return Path(configured) / (str(hydra_cfg.job.num) if multirun else "")
    return Path(hydra_cfg.runtime.output_dir) if hydra_cfg is not None else Path("outputs/run")


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input (config, data, model directories, checkpoints): their
    message says what to fix, so an entry point prints it instead of a traceback."""
    from rlhf_ray.checkpoint import CheckpointMismatchError
    from rlhf_ray.config import ConfigError
    from rlhf_ray.data.datasets import DataError
    from rlhf_ray.models.load import ModelDirError

    return ConfigError, DataError, ModelDirError, CheckpointMismatchError


def reports_user_errors(main: Callable) -> Callable:
    """Decorator of an entry point's ``main``: a user error prints ``error: <message>`` (one line
    per problem, each naming its key or file:line) on stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except user_errors() as e:
            from rlhf_ray.config import ConfigError

            lines = e.errors if isinstance(e, ConfigError) else str(e).splitlines()
            print("\n".join(f"error: {line}" for line in lines), file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


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
        connect(cfg.cluster)  # joins cluster.address / RAY_ADDRESS; no plan given, so nothing is checked yet
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


class AdapterOffReference:
    """The reference role served by the policy group: its base model with LoRA adapters off."""

    def __init__(self, policy: PolicyGroup):
        self.policy = policy

    def __repr__(self) -> str:
        return f"AdapterOffReference({self.policy!r})"

    def submit_logprobs(self, exp):
        return self.policy.submit_ref_logprobs(exp)

    def compute_logprobs(self, exp):
        return self.submit_logprobs(exp).result()

    def ready(self) -> None:
        """Nothing of its own to start (the policy group's ranks are waited for)."""

    def shutdown(self) -> None:
        """Nothing of its own to stop."""


@dataclass
class Groups:
    rollout: RolloutGroup
    reward: RewardGroup
    reference: ReferenceGroup | AdapterOffReference
    policy: PolicyGroup
    critic: CriticGroup | None
    init_seconds: dict[str, float] = field(default_factory=dict)
    """each role's seconds from spawn until it served calls (all roles start at once)"""

    def all(self) -> list:
        return [g for g in (self.rollout, self.reward, self.reference, self.policy, self.critic) if g]

    def shutdown(self) -> None:
        for g in self.all():
            g.shutdown()


OMP_SPIN_COUNT = "1000"
"""libgomp spin iterations at a barrier before an OpenMP thread sleeps (``GOMP_SPINCOUNT``)"""


def omp_wait_env(overlapping: bool) -> dict[str, str]:
    """How a CPU worker's OpenMP threads wait at barriers (an ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` in the driver's environment wins).

    ``overlapping``: other workers compute on the same cores at the same time, as in an RL run
    (reference, critic and reward forwards together; policy and critic updates together) and in
    evaluation. Threads then sleep at once (``OMP_WAIT_POLICY=PASSIVE``): a team that spins
    waits for a descheduled member at every op. Measured on this 2-core machine, the demo's PPO
    stage (80 steps, 2 threads per worker): 1.04 s/step passive, 1.18 s/step with a
    1,000-iteration spin; with load ~6, 1,790 ms per training step spinning with libgomp's
    default, 259 ms passive.

    Otherwise (a supervised stage: each rank computes on its own share of the cores) threads
    spin briefly, then sleep: the reward model's training step (2.4M model, 2 threads,
    in-process) idle 67-72 ms with a 1,000-iteration spin, 109-117 ms passive, 102-104 ms with
    100; beside 2 busy processes 183 ms against 200 ms passive, beside 6 busy processes 545
    against 560 ms. Only libgomp's default spin (300,000) wastes the machine under load: 478 ms
    beside 3 busy processes against 245 ms passive."""
    given = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    return given or ({"OMP_WAIT_POLICY": "PASSIVE"} if overlapping else {"GOMP_SPINCOUNT": OMP_SPIN_COUNT})


def worker_env(cfg: Config, overlapping: bool = True) -> dict[str, str]:
    """Environment of every worker of a run; ``overlapping``: see :func:`omp_wait_env`."""
    threads = str(cfg.cluster.threads_per_worker)
    env = {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false", **fault_env()}
    if cfg.cluster.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", VLLM_CPU_OMP_THREADS_BIND="nobind", **omp_wait_env(overlapping))
    return env


def build_groups(cfg: Config, assets: Assets) -> Groups:
    """Spawn every role's workers and start them all at once: placement, constructors and the
    DeepSpeed worlds of every role overlap (each group waits for its own in a thread)."""
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
        lora=m.lora if m.lora.rank and m.lora.sync == "adapter" else None,
    ), **dict(common, env=env_rollout), max_restarts=3, max_concurrency=8)  # weights load while generating
    reward = RewardGroup(plan["reward"], RewardWorker, lambda i, name: dict(
        name=name, cfg=cfg.reward, threads=c.threads_per_worker, seed=cfg.seed,
        trust_remote_code=m.trust_remote_code,
    ), **common, max_restarts=3, max_task_retries=3)  # scoring is idempotent: Ray may retry it
    reference = None if m.lora.rank else ReferenceGroup(plan["reference"], ReferenceWorker, lambda i, name: dict(
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
                                             max_staleness=cfg.trainer.max_staleness, lora=m.lora)), **common)
    # The one place that decides who serves the reference policy: its own worker, or with LoRA
    # the policy ranks with their adapters disabled (no second copy of the base weights).
    reference = reference or AdapterOffReference(policy)
    critic = None
    if cfg.algo.needs_critic:
        critic = CriticGroup(plan["critic"], CriticWorker, learner_kwargs(
            cfg.critic, assets.critic_path, dict(algo=cfg.algo)), **common)
    groups = Groups(rollout, reward, reference, policy, critic)
    try:
        groups.init_seconds = start_all([g for g in groups.all() if not isinstance(g, AdapterOffReference)])
    except BaseException:
        groups.shutdown()
        raise
    log.info("worker groups ready (seconds from spawn: %s):\n%s",
             ", ".join(f"{k} {v:.1f}" for k, v in groups.init_seconds.items()), format_plan(list(plan.values())))
    return groups
