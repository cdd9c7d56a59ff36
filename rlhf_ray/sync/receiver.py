"""The vLLM worker extension that receives weights (loaded into every vLLM worker via
``worker_extension_cls``; after OpenRLHF's ``vllm_worker_wrap.py``).

Each call streams the buckets into vLLM's in-place reload (``Worker.reload_weights``), which
works on the CPU backend where a second ``load_weights`` does not (ENV.md). The bucket layout
is passed in; the bytes arrive through the private process group or as Ray object refs.

Tied weights: vLLM's layerwise reload re-runs a module's weight post-processing only when that
module is sent a weight. A module that shares its weight with another (the output layer tied to
the input embeddings: Qwen2, Gemma, ...) is never sent one (Hugging Face state dicts hold the
tensor once, under the embeddings), so its data is updated through the shared tensor but its
post-processing is not redone. On the CPU backend that post-processing is where the output
layer's matmul kernel is built (``UnquantizedEmbeddingMethod.process_weights_after_loading`` ->
``dispatch_cpu_unquantized_gemm``, which prepacks a oneDNN copy of the weight), so the engine
would keep computing logits from the weights it started with. After every reload the receiver
re-runs the post-processing of every module that shares a weight with another one.

A LoRA adapter (``model.lora.sync=adapter``) comes the same way and is written as a PEFT
directory for vLLM's LoRA loader instead (``rlhf_receive_adapter``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from torch import nn

from rlhf_ray.sync.buckets import TensorMeta, empty_bucket, unpack
from rlhf_ray.sync.group import create_group, join_store, receive_from_root


def tied_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that hold a parameter another module holds too (tied weights), in model order."""
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(module)
    tied = {id(m) for mods in holders.values() if len(mods) > 1 for m in mods}
    return [m for m in model.modules() if id(m) in tied]


def reprocess_tied(model: nn.Module) -> int:
    """Redo the weight post-processing (kernel prepacking etc.) of the tied modules after an
    in-place reload; returns how many modules were redone. Unquantized post-processing only
    rebuilds kernel state from the current weights (on GPU it is a no-op), so redoing it for
    the module that was loaded too is harmless; quantized post-processing transforms the
    weights themselves and must not run twice, so a tied quantized module is refused."""
    done = 0
    for module in tied_modules(model):
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        if not type(method).__name__.startswith("Unquantized"):
            raise NotImplementedError(f"weight sync into a tied, quantized {type(module).__name__} "
                                      f"({type(method).__name__}) is not supported")
        method.process_weights_after_loading(module)
        done += 1
    return done


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
        reprocess_tied(self.get_model())
        return count
