"""A private process group between the sending learner rank and the rollout engines.

Built directly from a ``TCPStore`` and a ``ProcessGroupGloo``/``ProcessGroupNCCL`` so that it
never initialises or replaces ``torch.distributed``'s default group, which belongs to
DeepSpeed in the learner processes (ray.util.collective would take it over; see ENV.md).
Rank 0 is the learner and hosts the store; engine workers take ranks 1..world_size-1.
"""

from __future__ import annotations

import datetime

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


def host_store(host: str, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
    """Rank 0's rendezvous store, on a port the OS assigns while binding it (``store.port``).

    Picking a free port first and binding it later leaves a window in which another process
    (a busy node starts many) can take it; binding port 0 has no such window."""
    return dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def join_store(host: str, port: int, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def create_group(
    store: dist.Store, rank: int, world_size: int, device: str, timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """Join the group through ``store`` (rank 0's from ``host_store``, the others' from
    ``join_store``); gloo on ``cpu``, NCCL on ``cuda``."""
    prefixed = dist.PrefixStore("rlhf_ray_weight_sync", store)
    if device == "cuda":
        return dist.ProcessGroupNCCL(prefixed, rank, world_size)
    return dist.ProcessGroupGloo(prefixed, rank, world_size, datetime.timedelta(seconds=timeout_s))
