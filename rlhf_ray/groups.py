"""Worker groups: where ``ray.remote`` is applied. Each group spawns its role's named workers
into a placement group from the resource plan and offers typed methods that split a batch
across its workers and gather the results in order (``submit_*`` methods return a ``Pending``
so calls on different groups run concurrently). Every wait has a timeout, and an error names
the worker it came from."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.batch import Experience, RolloutSample
from rlhf_ray.calls import Pending, WorkerError, wait, wait_all
from rlhf_ray.placement import RolePlan
from rlhf_ray.sync.buckets import TensorMeta

__all__ = ["Pending", "WorkerError", "wait", "wait_all"]  # re-exported: callers import them from here


class Group:
    """Named workers of one role, one placement-group bundle each."""

    def __init__(self, plan: RolePlan, cls: type, kwargs_for, *, namespace: str, timeout_s: float,
                 env: dict[str, str] | None = None, max_restarts: int = 0, max_task_retries: int = 0,
                 max_concurrency: int = 1):
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
                max_restarts=max_restarts, max_task_retries=max_task_retries, max_concurrency=max_concurrency,
                # the GC rests while the worker imports its stack (rlhf_ray/__init__.py)
                runtime_env={"env_vars": {**(env or {}), "RLHF_RAY_START_UP_GC": "off"}},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(**kwargs_for(i, name))
            for i, name in enumerate(self.names)
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)})"

    def get(self, refs: list, what: str) -> list:
        return wait(refs, self.names[: len(refs)], f"{self.plan.role}.{what}", self.timeout_s)

    def pending(self, refs: list, what: str, combine: Callable[[list], Any] | None = None,
                names: list[str] | None = None) -> Pending:
        return Pending(refs, names or self.names[: len(refs)], f"{self.plan.role}.{what}", self.timeout_s,
                       combine or (lambda results: results))

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
        pending = [self.submit_generate(i, prompt_ids[s], list(range(s.start, s.stop)), seed=seed,
                                        min_version=min_version, n=n) for i, s in enumerate(parts)]
        return [sample for p in pending for sample in p.result()]

    def submit_generate(self, engine: int, prompt_ids: list[list[int]], prompt_indices: list[int], *, seed: int,
                        min_version: int, n: int | None = None, chunk_tokens: int = 0, wait_s: float = 0.0) -> Pending:
        """One engine's share; ``wait_s > 0`` lets the engine wait that long for ``min_version``."""
        ref = self.workers[engine].generate.remote(prompt_ids, prompt_indices, seed=seed, min_version=min_version,
                                                   n=n, chunk_tokens=chunk_tokens, wait_s=wait_s)
        return self.pending([ref], "generate", lambda r: r[0], names=[self.names[engine]])

    def busy_seconds(self) -> list[float]:
        return self.get([w.busy_seconds.remote() for w in self.workers], "busy_seconds")

    def versions(self, timeout_s: float | None = None) -> list[int]:
        refs = [w.weight_version.remote() for w in self.workers]
        return wait(refs, self.names, "rollout.weight_version", timeout_s or self.timeout_s)

    def init_weight_group(self, host: str, port: int, tp: int, timeout_s: float) -> list:
        return [w.init_weight_group.remote(host, port, 1 + i * tp, 1 + len(self.workers) * tp, timeout_s)
                for i, w in enumerate(self.workers)]

    def receive_weights(self, plan: list[list[TensorMeta]], version: int, refs: list | None,
                        check: list[list[int]] | None = None, adapter: dict | None = None) -> list:
        """Every engine loads ``version`` (``adapter``: a LoRA adapter with that PEFT config);
        each answers ``(version, logprobs of check)``."""
        return [w.receive_weights.remote(plan, version, refs, check, adapter) for w in self.workers]

    def score_tokens(self, sequences: list[list[int]]) -> list[list[list[float]]]:
        """Every engine's logprobs of the same sequences (the post-sync spot check)."""
        return self.get([w.score_tokens.remote(sequences) for w in self.workers], "score_tokens")


def _merge_scores(results: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    return {k: [x for r in results for x in r[k]] for k in results[0]}


class RewardGroup(Group):
    def score(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
        return self.submit_score(prompts, completions).result()

    def submit_score(self, prompts: list[str], completions: list[str]) -> Pending:
        """Score across the reward workers; ``result()`` is ``{"reward": [...], ...}`` in order."""
        parts = [s for s in chunks(len(prompts), len(self.workers)) if s.stop > s.start] or [slice(0, 0)]
        refs = [w.score.remote(prompts[s], completions[s]) for w, s in zip(self.workers, parts, strict=False)]
        return self.pending(refs, "score", _merge_scores)


class ReferenceGroup(Group):
    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        return self.submit_logprobs(exp).result()

    def submit_logprobs(self, exp: Experience) -> Pending:
        parts = chunks(len(exp), len(self.workers))
        refs = [w.compute_logprobs.remote(exp.select(s)) for w, s in zip(self.workers, parts, strict=True)]
        return self.pending(refs, "compute_logprobs", torch.cat)


def mean_of(results: list[dict[str, float]]) -> dict[str, float]:
    """Metrics averaged over the ranks of a DeepSpeed group."""
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


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
        return mean_of(self.get(refs, what))

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
        return self.submit_logprobs(exp).result()

    def submit_logprobs(self, exp: Experience) -> Pending:
        shards = exp.split(len(self.workers))
        refs = [w.compute_logprobs.remote(s) for w, s in zip(self.workers, shards, strict=True)]
        return self.pending(refs, "compute_logprobs", torch.cat)

    def submit_ref_logprobs(self, exp: Experience) -> Pending:
        """Reference logprobs from the ranks with LoRA adapters disabled (LoRA runs only)."""
        shards = exp.split(len(self.workers))
        refs = [w.compute_ref_logprobs.remote(s) for w, s in zip(self.workers, shards, strict=True)]
        return self.pending(refs, "compute_ref_logprobs", torch.cat)

    def submit_logprobs_replicated(self, exp: Experience) -> Pending:
        """Every rank computes the same small batch (any size; ZeRO-3 needs all ranks); the
        result is rank 0's."""
        refs = [w.compute_logprobs.remote(exp) for w in self.workers]
        return self.pending(refs, "compute_logprobs", lambda results: results[0])

    def update(self, exp: Experience, kl_coef: float) -> dict[str, float]:
        return self.submit_update(exp, kl_coef).result()

    def submit_update(self, exp: Experience, kl_coef: float) -> Pending:
        shards = exp.split(len(self.workers))
        refs = [w.update.remote(s, kl_coef) for w, s in zip(self.workers, shards, strict=True)]
        return self.pending(refs, "update", mean_of)

    def weight_manifest(self) -> list[TensorMeta]:
        return self.get([self.workers[0].weight_manifest.remote()], "weight_manifest")[0]

    def adapter_config(self) -> dict | None:
        """The PEFT config of the adapter the engines serve (``model.lora.sync=adapter``), else None."""
        return self.get([self.workers[0].adapter_config.remote()], "adapter_config")[0]

    def weight_group_address(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        ref = self.workers[0].weight_group_address.remote(world_size, timeout_s)
        return self.get([ref], "weight_group_address")[0]

    def init_weight_group(self, world_size: int, timeout_s: float) -> list:
        return [self.workers[0].init_weight_group.remote(world_size, timeout_s)]

    def send_weights(self, plan: list[list[TensorMeta]], use_object_store: bool) -> list:
        return [w.send_weights.remote(plan, use_object_store) for w in self.workers]


class CriticGroup(DeepSpeedGroup):
    def compute_values(self, exp: Experience) -> torch.Tensor:
        return self.submit_values(exp).result()

    def submit_values(self, exp: Experience) -> Pending:
        shards = exp.split(len(self.workers))
        refs = [w.compute_values.remote(s) for w, s in zip(self.workers, shards, strict=True)]
        return self.pending(refs, "compute_values", torch.cat)

    def update(self, exp: Experience) -> dict[str, float]:
        return self.submit_update(exp).result()

    def submit_update(self, exp: Experience) -> Pending:
        shards = exp.split(len(self.workers))
        return self.pending([w.update.remote(s) for w, s in zip(self.workers, shards, strict=True)], "update", mean_of)
