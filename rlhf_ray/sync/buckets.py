"""Bucketing of named tensors: a bucket is one flat tensor of a single dtype.

Sending one flat buffer per bucket instead of one message per tensor keeps the number of
collective calls (or object-store puts) small; both ends derive the same layout from the
same ``list[TensorMeta]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorMeta:
    name: str  # Hugging Face parameter name, as vLLM's load_weights expects it
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Group tensors in order into buckets of at most ``bucket_bytes`` (a larger tensor gets
    a bucket of its own) and of a single dtype."""
    buckets: list[list[TensorMeta]] = []
    size = 0
    for m in metas:
        current = buckets[-1] if buckets else None
        if current is None or current[0].dtype != m.dtype or size + m.nbytes > bucket_bytes:
            buckets.append([m])
            size = m.nbytes
        else:
            current.append(m)
            size += m.nbytes
    return buckets


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors of one dtype into a flat, contiguous buffer."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def empty_bucket(bucket: list[TensorMeta], device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.empty(sum(m.numel for m in bucket), dtype=bucket[0].torch_dtype, device=device)


def unpack(flat: torch.Tensor, bucket: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``pack``: views of ``flat`` with each tensor's name and shape."""
    out, offset = [], 0
    for m in bucket:
        out.append((m.name, flat[offset : offset + m.numel].view(m.shape)))
        offset += m.numel
    if offset != flat.numel():
        raise ValueError(f"bucket holds {flat.numel()} elements, its layout expects {offset}")
    return out
