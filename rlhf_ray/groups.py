"""Worker groups: where ``ray.remote`` is applied. Each group spawns its role's named workers
into a placement group from the resource plan and offers typed methods that split a batch
across its workers and gather the results in order. Every wait has a timeout, and an error
names the worker it came from."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import ray
import torch
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.batch import Experience, RolloutSample
from rlhf_ray.placement import RolePlan
from rlhf_ray.sync.buckets import TensorMeta


class WorkerError(RuntimeError):
    """A remote call failed or timed out; the message names the worker."""


def wait(refs: list, workers: list, what: str, timeout_s: float) -> list:
    """``ray.get`` of one ref per worker, in order. Fails as soon as any worker fails (its
    peers may be blocked in a collective with it and would never answer), naming it; after
    ``timeout_s`` names the workers that have not answered."""
    name_of = {r: w for r, w in zip(refs, workers, strict=True)}
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            stuck = ", ".join(repr(name_of[r]) for r in pending)
            raise WorkerError(f"{what}: no answer after {timeout_s:.0f}s from {stuck}")
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as e:
            raise WorkerError(f"{what} failed on {name_of[ready[0]]!r}: {e}") from e
    return ray.get(list(refs))


class Group:
    """Named workers of one role, one placement-group bundle each."""

    def __init__(self, plan: RolePlan, cls: type, kwargs_for, *, namespace: str, timeout_s: float,
                 env: dict[str, str] | None = None, max_restarts: int = 0, max_task_retries: int = 0):
        self.plan, self.timeout_s = plan, timeout_s
        self.spawned_at = time.monotonic()
        # No wait here: workers scheduled into the placement group start as soon as it is placed,
        # so every group's placement and constructors overlap (``ready`` waits, with a timeout).
        self.pg = placement_group([plan.bundle() for _ in range(plan.workers)], strategy=plan.strategy,
                                  name=f"rlhf_ray-{plan.role}")
        remote_cls = ray.remote(cls)
        self.names = [f"{plan.role}-{i}" for i in range(plan.workers)]
        self.workers = [
            remote_cls.options(
                name=name, namespace=namespace, num_cpus=plan.cpus, num_gpus=plan.gpus,
                max_restarts=max_restarts, max_task_retries=max_task_retries,
                runtime_env={"env_vars": env or {}},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(**kwargs_for(i, name))
            for i, name in enumerate(self.names)
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)})"

    def get(self, refs: list, what: str) -> list:
        return wait(refs, self.names[: len(refs)], f"{self.plan.role}.{what}", self.timeout_s)

    def ready(self) -> None:
        """Wait until the placement group is placed and every worker's constructor has finished."""
        wait([self.pg.ready()], [f"placement group rlhf_ray-{self.plan.role}"], f"{self.plan.role}.place",
             self.timeout_s)
        self.get([w.__ray_ready__.remote() for w in self.workers], "start")

    def start(self) -> float:
        """Wait until the group can serve calls; returns seconds since it was spawned."""
        self.ready()
        return time.monotonic() - self.spawned_at

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        ray.util.remove_placement_group(self.pg)


def chunks(n_items: int, n_parts: int) -> list[slice]:
    """Contiguous, near-equal slices covering ``range(n_items)``."""
    size, rem = divmod(n_items, n_parts)
    out, start = [], 0
    for i in range(n_parts):
        stop = start + size + (i < rem)
        out.append(slice(start, stop))
        start = stop
    return out


class RolloutGroup(Group):
    def generate(self, prompt_ids: list[list[int]], *, seed: int, min_version: int,
                 n: int | None = None) -> list[RolloutSample]:
        """Split prompts across engines; samples come back in prompt order."""
        parts = chunks(len(prompt_ids), len(self.workers))
        refs = [
            w.generate.remote(prompt_ids[s], list(range(s.start, s.stop)), seed=seed, min_version=min_version, n=n)
            for w, s in zip(self.workers, parts, strict=True)
        ]
        return [sample for part in self.get(refs, "generate") for sample in part]

    def versions(self, timeout_s: float | None = None) -> list[int]:
        refs = [w.weight_version.remote() for w in self.workers]
        return wait(refs, self.names, "rollout.weight_version", timeout_s or self.timeout_s)

    def init_weight_group(self, host: str, port: int, tp: int) -> list:
        return [w.init_weight_group.remote(host, port, 1 + i * tp, 1 + len(self.workers) * tp)
                for i, w in enumerate(self.workers)]

    def receive_weights(self, plan: list[list[TensorMeta]], version: int, refs: list | None) -> list:
        return [w.receive_weights.remote(plan, version, refs) for w in self.workers]

    def score_tokens(self, sequences: list[list[int]]) -> list[list[list[float]]]:
        """Every engine's logprobs of the same sequences (the post-sync spot check)."""
        return self.get([w.score_tokens.remote(sequences) for w in self.workers], "score_tokens")


class RewardGroup(Group):
    def score(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
        parts = chunks(len(prompts), len(self.workers))
        refs = [w.score.remote(prompts[s], completions[s]) for w, s in zip(self.workers, parts, strict=True)]
        results = self.get(refs, "score")
        return {k: [x for r in results for x in r[k]] for k in results[0]}


class ReferenceGroup(Group):
    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        parts = chunks(len(exp), len(self.workers))
        refs = [w.compute_logprobs.remote(exp.select(s)) for w, s in zip(self.workers, parts, strict=True)]
        return torch.cat(self.get(refs, "compute_logprobs"))


def start_all(groups: list[Group]) -> dict[str, float]:
    """Start every group at once (each waits for its own workers, then wires its world, in its
    own thread); returns each role's seconds from spawn to serving. The first failure is raised
    as soon as it happens, naming its worker; each wait has its group's timeout."""
    pool = ThreadPoolExecutor(max_workers=max(len(groups), 1), thread_name_prefix="start")
    futures = {pool.submit(g.start): g.plan.role for g in groups}
    try:
        done, _ = wait_futures(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            f.result()  # the first failure; the caller shuts the groups down, which ends the other waits
        return {futures[f]: f.result() for f in futures}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class DeepSpeedGroup(Group):
    """Ranks of one DeepSpeed world; rank 0 hosts the rendezvous."""

    def start(self) -> float:
        self.ready()
        self.init_world()
        return time.monotonic() - self.spawned_at

    def init_world(self) -> None:
        host, port = self.get([self.workers[0].address.remote()], "address")[0]
        self.get([w.init.remote(host, port) for w in self.workers], "init")

    def mean_metrics(self, refs: list, what: str) -> dict[str, float]:
        results = self.get(refs, what)
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def save_hf(self, path: str) -> None:
        self.get([w.save_hf.remote(path) for w in self.workers], "save_hf")

    def save_checkpoint(self, path: str) -> None:
        self.get([w.save_checkpoint.remote(path) for w in self.workers], "save_checkpoint")

    def load_checkpoint(self, path: str) -> None:
        self.get([w.load_checkpoint.remote(path) for w in self.workers], "load_checkpoint")

    def checksum(self) -> float:
        return self.get([w.parameter_checksum.remote() for w in self.workers], "checksum")[0]


class PolicyGroup(DeepSpeedGroup):
    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        shards = exp.split(len(self.workers))
        return torch.cat(self.get([w.compute_logprobs.remote(s) for w, s in zip(self.workers, shards, strict=True)],
                                  "compute_logprobs"))

    def compute_logprobs_replicated(self, exp: Experience) -> torch.Tensor:
        """Every rank computes the same small batch (any size; ZeRO-3 needs all ranks)."""
        return self.get([w.compute_logprobs.remote(exp) for w in self.workers], "compute_logprobs")[0]

    def update(self, exp: Experience, kl_coef: float) -> dict[str, float]:
        shards = exp.split(len(self.workers))
        return self.mean_metrics([w.update.remote(s, kl_coef) for w, s in zip(self.workers, shards, strict=True)], "update")

    def weight_manifest(self) -> list[TensorMeta]:
        return self.get([self.workers[0].weight_manifest.remote()], "weight_manifest")[0]

    def weight_group_address(self, world_size: int) -> tuple[str, int]:
        return self.get([self.workers[0].weight_group_address.remote(world_size)], "weight_group_address")[0]

    def init_weight_group(self, world_size: int) -> list:
        return [self.workers[0].init_weight_group.remote(world_size)]

    def send_weights(self, plan: list[list[TensorMeta]], use_object_store: bool) -> list:
        return [w.send_weights.remote(plan, use_object_store) for w in self.workers]


class CriticGroup(DeepSpeedGroup):
    def compute_values(self, exp: Experience) -> torch.Tensor:
        shards = exp.split(len(self.workers))
        return torch.cat(self.get([w.compute_values.remote(s) for w, s in zip(self.workers, shards, strict=True)],
                                  "compute_values"))

    def update(self, exp: Experience) -> dict[str, float]:
        shards = exp.split(len(self.workers))
        return self.mean_metrics([w.update.remote(s) for w, s in zip(self.workers, shards, strict=True)], "update")
