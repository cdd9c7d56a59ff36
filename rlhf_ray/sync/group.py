"""A private process group between the sending learner rank and the rollout engines.

Built directly from a ``TCPStore`` and a ``ProcessGroupGloo``/``ProcessGroupNCCL`` so that it
never initialises or replaces ``torch.distributed``'s default group, which belongs to
DeepSpeed in the learner processes (ray.util.collective would take it over; see ENV.md).
Rank 0 is the learner and hosts the store; engine workers take ranks 1..world_size-1.

The learner sends every bucket to each engine rank on its own (point-to-point, all posted at
once) rather than one broadcast: with a broadcast, a dead engine fails the root at once but
leaves the live engines blocked in it until the group's timeout (seen: gloo's 300 s), holding
their engine; with one send per rank a dead engine fails only its own send, the others receive
every bucket. The group's timeout (``sync.timeout_s``) bounds a transfer to a peer that hangs
without dying. A replaced engine gets a new group (``WeightSync.repair``).
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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
    timeout = datetime.timedelta(seconds=timeout_s)
    if device == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)


def send_to_ranks(group: dist.ProcessGroup, flat: torch.Tensor, ranks: list[int], unreached: set[int]) -> None:
    """Send ``flat`` from rank 0 to each of ``ranks`` not in ``unreached`` (every send posted
    before any is waited for); a rank whose send fails is added to ``unreached`` and skipped
    for the rest of the push, the others still get ``flat``."""
    works = {}
    for r in ranks:
        if r in unreached:
            continue
        try:  # gloo refuses at once to post to a peer whose connection closed (a dead engine)
            works[r] = group.send([flat], r, 0)
        except RuntimeError as e:
            log.warning("weight sync: rank %d unreachable (%s)", r, str(e).splitlines()[0][:200])
            unreached.add(r)
    for r, work in works.items():
        try:
            work.wait()
        except RuntimeError as e:
            log.warning("weight sync: send to rank %d failed (%s)", r, str(e).splitlines()[0][:200])
            unreached.add(r)


def receive_from_root(group: dist.ProcessGroup, flat: torch.Tensor) -> None:
    """Counterpart of ``send_to_ranks`` on an engine rank: ``flat`` filled from rank 0."""
    group.recv([flat], 0, 0).wait()
