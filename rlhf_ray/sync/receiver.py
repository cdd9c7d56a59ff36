"""The vLLM worker extension that receives weights (loaded into every vLLM worker via
``worker_extension_cls``; after OpenRLHF's ``vllm_worker_wrap.py``).

Each call streams the buckets into vLLM's in-place reload (``Worker.reload_weights``), which
works on the CPU backend where a second ``load_weights`` does not (ENV.md). The bucket layout
is passed in; the bytes arrive through the private process group or as Ray object refs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rlhf_ray.sync.buckets import TensorMeta, empty_bucket, unpack
from rlhf_ray.sync.group import create_group, join_store, receive_from_root


class WeightReceiver:
    """Mixed into vLLM's worker class; ``self`` is the vLLM worker."""

    def rlhf_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                               timeout_s: float = 300.0) -> None:
        device = "cuda" if torch.cuda.is_available() and self.device.type == "cuda" else "cpu"
        store = join_store(host, port, world_size, timeout_s)
        self._rlhf_group = create_group(store, rank_offset + self.rank, world_size, device, timeout_s)
        self._rlhf_device = device

    def _rlhf_collective_stream(self, plan: list[list[TensorMeta]]) -> Iterator[tuple[str, torch.Tensor]]:
        group = getattr(self, "_rlhf_group", None)
        if group is None:  # a restarted engine, before WeightSync.repair built the new group
            raise RuntimeError("this engine has not joined a weight-sync group (restarted?)")
        for bucket in plan:
            flat = empty_bucket(bucket, self._rlhf_device)
            receive_from_root(group, flat)
            yield from unpack(flat, bucket)

    @staticmethod
    def _rlhf_object_stream(plan: list[list[TensorMeta]], refs: list) -> Iterator[tuple[str, torch.Tensor]]:
        import ray

        for bucket, ref in zip(plan, refs, strict=True):
            yield from unpack(ray.get(ref), bucket)

    def rlhf_receive_weights(self, plan: list[list[TensorMeta]], refs: list | None = None) -> int:
        """Load the streamed weights in place; returns the number of tensors received."""
        stream = self._rlhf_collective_stream(plan) if refs is None else self._rlhf_object_stream(plan, refs)
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in stream:
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted())
        return count
