"""What every worker process sets up the same way: threads, seeds, the device."""

from __future__ import annotations

import gc
import os
import random

import torch


def started_up() -> None:
    """A spawned worker's imports are done: if its start-up paused the GC (rlhf_ray/__init__.py),
    freeze what the imports built (the GC never scans those objects again, as vLLM does after
    its own start-up) and turn the GC back on. vLLM's engine start collects the whole heap five
    times (1.4 s on this machine); over a frozen heap that takes milliseconds. A worker built in
    some other process (a test, a notebook) leaves that process's GC as it is."""
    import rlhf_ray

    if rlhf_ray.start_up_gc_paused:
        rlhf_ray.start_up_gc_paused = False
        gc.freeze()
        gc.enable()


def setup_process(threads: int, seed: int) -> None:
    """Pin this process to ``threads`` torch/OMP threads (the cores are shared by every worker
    on a node) and seed python, numpy and torch; ends the start-up's GC pause (``started_up``)."""
    started_up()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with the stack
        pass


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def device_for(device: str) -> torch.device:
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.device_count() > 1 else 0
        return torch.device("cuda", local)
    return torch.device("cpu")
