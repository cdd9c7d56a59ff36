"""Weight buckets and the private sync group (a dead engine rank does not block the others)."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import torch
import torch.distributed as dist

from rlhf_ray.sync import TensorMeta, pack, plan_buckets, unpack
from rlhf_ray.sync.buckets import empty_bucket
from rlhf_ray.sync.group import create_group, host_store, join_store, receive_from_root, send_to_ranks


def metas():
    return [TensorMeta("a", (4, 4), "float32"), TensorMeta("b", (16,), "float32"),
            TensorMeta("c", (100,), "float32"), TensorMeta("d", (2,), "bfloat16")]


def test_plan_respects_size_and_dtype():
    buckets = plan_buckets(metas(), bucket_bytes=128)
    # a (64 B) + b (64 B) fill one bucket; c (400 B) is larger than a bucket: its own; d: new dtype
    assert [[m.name for m in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]
    assert len(plan_buckets(metas(), bucket_bytes=10**9)) == 2  # one per dtype


def test_pack_unpack_roundtrip():
    bucket = plan_buckets(metas()[:3], 10**9)[0]
    tensors = [torch.randn(m.shape) for m in bucket]
    out = unpack(pack(tensors), bucket)
    assert [n for n, _ in out] == ["a", "b", "c"]
    for t, (_, u) in zip(tensors, out, strict=True):
        assert torch.equal(t, u)


def test_private_group_broadcasts_without_default_group():
    bucket = plan_buckets(metas()[:3], 10**9)[0]
    world = 3
    master = host_store("127.0.0.1", world, timeout_s=60)
    default_before = dist.is_initialized() and dist.get_world_size()
    source = pack([torch.randn(m.shape) for m in bucket])
    received = {}

    def member(rank: int) -> None:
        store = master if rank == 0 else join_store("127.0.0.1", master.port, world, timeout_s=60)
        group = create_group(store, rank, world, "cpu", timeout_s=60)
        buf = source.clone() if rank == 0 else empty_bucket(bucket)
        group.broadcast(buf, 0).wait()
        received[rank] = buf

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(torch.equal(received[r], source) for r in range(world))
    # the default group (DeepSpeed's, in a learner) is neither created nor replaced
    assert (dist.is_initialized() and dist.get_world_size()) == default_before


def _engine(rank: int, port: int, world: int, first_push_done, results) -> None:
    """An engine rank in its own process: receives one push, then rank 2 dies and rank 1
    receives the next two pushes (3 buckets each) and reports how long they took."""
    store = join_store("127.0.0.1", port, world, timeout_s=60)
    group = create_group(store, rank, world, "cpu", timeout_s=30)
    buf = torch.empty(1000)
    for _ in range(3):
        receive_from_root(group, buf)
    first_push_done[rank].set()  # an Event, not a Queue: a queue's feeder thread may not flush before the exit
    if rank == 2:
        os._exit(1)  # a dead engine: its process is gone, its connections closed
    start = time.monotonic()
    total = 0.0
    for _ in range(6):
        receive_from_root(group, buf)
        total += float(buf.sum())
    results.put((rank, time.monotonic() - start, total))


def test_a_dead_engine_does_not_block_the_live_ones():
    """Rank 0 sends each bucket to every engine rank on its own: after rank 2 died, the sends to
    it fail at once (it is reported unreached) and rank 1 still receives every bucket, in well
    under the group's 30 s timeout (a broadcast would leave rank 1 waiting for all of it)."""
    world = 3
    master = host_store("127.0.0.1", world, timeout_s=60)
    ctx = mp.get_context("spawn")
    first_push_done, results = {1: ctx.Event(), 2: ctx.Event()}, ctx.Queue()
    procs = [ctx.Process(target=_engine, args=(r, master.port, world, first_push_done, results)) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        group = create_group(master, 0, world, "cpu", timeout_s=30)
        unreached: set[int] = set()
        for _ in range(3):
            send_to_ranks(group, torch.zeros(1000), [1, 2], unreached)
        assert unreached == set()
        assert first_push_done[1].wait(60) and first_push_done[2].wait(60)
        procs[1].join(30)  # rank 2 is gone
        start = time.monotonic()
        for _ in range(6):
            send_to_ranks(group, torch.ones(1000), [1, 2], unreached)
        assert unreached == {2} and time.monotonic() - start < 10
        rank, seconds, total = results.get(timeout=30)
        assert rank == 1 and total == 6 * 1000.0 and seconds < 10
    finally:
        for p in procs:
            p.kill()
