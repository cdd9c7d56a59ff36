"""The default topology: how many vLLM engines and DeepSpeed ranks a run uses, and how many
threads each worker pins, when the config leaves them at 0 (auto). Decided here and nowhere
else; the config dataclasses call these functions when they are built, so every entry point
(RL, SFT, reward model, evaluation, the pipeline, tests) runs the same resolved numbers, and
``config.json`` records them.

Why one worker per role with every core: a synchronous step runs its phases one after the
other (rollout, experience, update, sync), so each phase has the whole machine to itself; one
engine and one rank with ``cores`` threads beat two of each with one thread (no gradient
all-reduce, no split batches, bigger matmuls). Measured on a 2-core machine with
``bench/throughput.py`` (README, Performance). From ``2 x CORES_PER_WORKER`` cores a role gets
two workers; that split is a rule of thumb, not a measurement. On GPU each worker holds one
device (a tensor-parallel engine several), so auto means one worker per role: set the counts
for more devices.
"""

from __future__ import annotations

import os

CORES_PER_WORKER = 8
"""cores one worker's threads use well before a role is better served by a second worker"""
MAX_AUTO_WORKERS = 2
"""auto never goes past this: the default batch (64 sequences, 2 minibatches of 8) splits
evenly across 2 ranks, not across more; bigger machines set the counts with their batch"""


def machine_cores() -> int:
    """Cores this process may run on (the CPU affinity mask when the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_workers(device: str, cores: int | None = None) -> int:
    """Workers per role (engines, learner ranks) for ``num_engines`` / ``num_ranks`` = 0."""
    if device == "cuda":
        return 1
    return min(MAX_AUTO_WORKERS, max(1, (cores or machine_cores()) // CORES_PER_WORKER))


def auto_threads(device: str, cores: int | None = None) -> int:
    """torch/OMP threads per worker for ``cluster.threads_per_worker`` = 0: every core of a
    worker's share of the machine (phases take turns, so workers rarely compute at once)."""
    cores = cores or machine_cores()
    return max(1, cores // auto_workers(device, cores)) if device == "cpu" else min(cores, 4)
