"""Weight buckets and the private sync group."""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from rlhf_ray.sync import TensorMeta, pack, plan_buckets, unpack
from rlhf_ray.sync.buckets import empty_bucket
from rlhf_ray.sync.group import create_group, host_store, join_store


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
