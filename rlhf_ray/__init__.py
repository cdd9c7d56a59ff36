"""rlhf_ray: distributed RLHF (SFT, reward model, PPO/GRPO/RLOO/...) on Ray, with vLLM rollout
engines and DeepSpeed ZeRO learner groups. ``python -m rlhf_ray.train`` is the RL entry point."""

import gc as _gc
import os as _os

__version__ = "0.1.0"

# A worker's start-up (rlhf_ray.groups sets RLHF_RAY_START_UP_GC=off in every worker it spawns):
# this package is imported first, then torch, transformers, DeepSpeed or vLLM, and about a
# quarter of that import time is the cyclic GC scanning the growing heap (on this 2-core machine
# a policy worker's imports take 3.7 s instead of 4.9 s without it, an engine's 6.5 s instead of
# 8.5 s). The GC stays off until the worker calls rlhf_ray.workers.common.started_up() once its
# imports are done. The variable is dropped here, so processes the worker spawns start as usual.
start_up_gc_paused = _os.environ.pop("RLHF_RAY_START_UP_GC", "") == "off"
if start_up_gc_paused:
    _gc.disable()
