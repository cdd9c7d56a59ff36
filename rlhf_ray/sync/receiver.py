"""The vLLM worker extension that receives weights (loaded into every vLLM worker via
``worker_extension_cls``; after OpenRLHF's ``vllm_worker_wrap.py``).

Each call streams the buckets into vLLM's in-place reload (``Worker.reload_weights``), which
works on the CPU backend where a second ``load_weights`` does not (ENV.md). The bucket layout
is passed in; the bytes arrive through the private process group or as Ray object refs.
A LoRA adapter (``model.lora.sync=adapter``) comes the same way and is written as a PEFT
directory for vLLM's LoRA loader instead (``rlhf_receive_adapter``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from rlhf_ray.sync.buckets import TensorMeta, empty_bucket, unpack
from rlhf_ray.sync.group import create_group, join_store


class WeightReceiver:
    """Mixed into vLLM's worker class; ``self`` is the vLLM worker."""

    def rlhf_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        device = "cuda" if torch.cuda.is_available() and self.device.type == "cuda" else "cpu"
        store = join_store(host, port, world_size)
        self._rlhf_group = create_group(store, rank_offset + self.rank, world_size, device)
        self._rlhf_device = device

    def _rlhf_collective_stream(self, plan: list[list[TensorMeta]]) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in plan:
            flat = empty_bucket(bucket, self._rlhf_device)
            self._rlhf_group.broadcast(flat, 0).wait()
            yield from unpack(flat, bucket)

    @staticmethod
    def _rlhf_object_stream(plan: list[list[TensorMeta]], refs: list) -> Iterator[tuple[str, torch.Tensor]]:
        import ray

        for bucket, ref in zip(plan, refs, strict=True):
            yield from unpack(ray.get(ref), bucket)

    def _rlhf_stream(self, plan: list[list[TensorMeta]], refs: list | None) -> Iterator[tuple[str, torch.Tensor]]:
        return self._rlhf_collective_stream(plan) if refs is None else self._rlhf_object_stream(plan, refs)

    def rlhf_receive_adapter(self, plan: list[list[TensorMeta]], refs: list | None, path: str, config: dict) -> int:
        """Receive the adapter tensors and write them with ``config`` as a PEFT adapter directory
        at ``path`` (this node's disk; the engine then loads it as a LoRA adapter). Returns the
        number of tensors."""
        from safetensors.torch import save_file

        tensors = {name: t.clone() for name, t in self._rlhf_stream(plan, refs)}  # views of one bucket: copy
        if self.rank == 0:  # tensor-parallel workers of one engine share the node's disk
            os.makedirs(path)
            save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
            with open(os.path.join(path, "adapter_config.json"), "w") as f:
                json.dump(config, f)
        return len(tensors)

    def rlhf_receive_weights(self, plan: list[list[TensorMeta]], refs: list | None = None) -> int:
        """Load the streamed weights in place; returns the number of tensors received."""
        stream = self._rlhf_stream(plan, refs)
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in stream:
                count += 1
                yield item

        self.reload_weights(weights_iterator=counted())
        return count
