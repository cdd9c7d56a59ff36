"""A private process group between the sending learner rank and the rollout engines.

Built directly from a ``TCPStore`` and a ``ProcessGroupGloo``/``ProcessGroupNCCL`` so that it
never initialises or replaces ``torch.distributed``'s default group, which belongs to
DeepSpeed in the learner processes (ray.util.collective would take it over; see ENV.md).
Rank 0 is the learner and hosts the store; engine workers take ranks 1..world_size-1.
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist


def node_ip() -> str:
    """This node's IP as Ray sees it (falls back to loopback outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside a Ray worker the loopback address is right
        pass
    return "127.0.0.1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def create_group(
    host: str, port: int, rank: int, world_size: int, device: str, timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """Join (rank 0: host) the group; gloo on ``cpu``, NCCL on ``cuda``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore("rlhf_ray_weight_sync", store)
    if device == "cuda":
        return dist.ProcessGroupNCCL(prefixed, rank, world_size)
    return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
