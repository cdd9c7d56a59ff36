"""Weight transfer from the learner group to the vLLM rollout engines.

The learner streams its full weights as ``(hf_name, tensor)`` buckets (gathered from ZeRO-3
shards where needed); each engine's worker extension receives them into vLLM's in-place
reload path. Two backends move the bytes: a private process group (gloo on CPU, NCCL on GPU)
that never touches DeepSpeed's default group, and the Ray object store.
"""

from rlhf_ray.sync.buckets import TensorMeta, pack, plan_buckets, unpack

__all__ = ["TensorMeta", "pack", "plan_buckets", "unpack"]
