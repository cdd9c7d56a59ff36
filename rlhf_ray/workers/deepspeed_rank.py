"""One rank of a DeepSpeed ZeRO data-parallel group (shared by the policy and critic workers).

A group of these Ray workers forms one ``torch.distributed`` world (gloo on CPU, NCCL on GPU)
that belongs to DeepSpeed alone. ``train_on`` runs the minibatch epochs with gradient
accumulation over (trimmed, optionally token-budget) micro-batches, each contributing its share of
the FULL minibatch loss (counts all-reduced over the ranks); DeepSpeed averages gradients across
ranks, clips them and steps the optimizer and LR schedule at each accumulation boundary.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from rlhf_ray.algo import LossNormalizer
from rlhf_ray.batch import Experience
from rlhf_ray.config import LearnerConfig
from rlhf_ray.faults import maybe_fail
from rlhf_ray.micro_batches import micro_batches
from rlhf_ray.micro_batches import plan as micro_plan
from rlhf_ray.sync.group import host_store, join_store, node_ip
from rlhf_ray.workers.common import device_for, setup_process, torch_dtype
from rlhf_ray.workers.forward import batched

# (micro-batch, the full minibatch's loss normaliser) -> (this micro-batch's share of the loss, metrics' shares)
LossFn = Callable[[Experience, LossNormalizer], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step on EVERY rank when any rank sees a non-finite gradient.

    Under ZeRO each rank steps only its partition, so the decision is all-reduced: otherwise
    one rank would update and another not, and the replicas would silently diverge. A skipped
    step leaves weights and optimizer state untouched (the LR schedule still advances).
    """

    skipped = 0

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = any(not torch.isfinite(p.grad).all() for p in params)
        flag = torch.tensor([float(bad)], device=params[0].device if params else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.skipped += 1
            return None
        return super().step(closure)


def deepspeed_config(cfg: LearnerConfig, gradient_accumulation_steps: int, dtype: str) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        # our torch AdamW works under every stage (DeepSpeed's CPU Adam would need a JIT build)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def skip_shm_comm_op() -> None:
    """Keep ``deepspeed.init_distributed`` from JIT-building its CPU shared-memory comm op.

    DeepSpeed's torch backend builds ``deepspeed_shm_comm`` (g++, into the torch extensions
    cache) on every CPU start, under a ``lock`` file in that cache; a run killed mid-build leaves
    the lock, and every later run then waits in torch's ``FileBaton.wait`` forever. The op only
    serves ``inference_all_reduce`` (DeepSpeed's tensor-parallel inference), which nothing here
    calls: training collectives go through torch.distributed (gloo/NCCL). DeepSpeed asks
    ``deepspeed.ops.__compatible_ops__`` (probed once per process, kept as a dict whose edits
    persist) before building, so marking the op incompatible skips the build and the lock.
    On GPU the accelerator has no such op and this changes nothing."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedRank:
    """Subclasses provide ``build_model``; the group calls ``address`` on rank 0, then ``init``
    on every rank at once."""

    role = "learner"

    def __init__(
        self, name: str, rank: int, world_size: int, cfg: LearnerConfig, model_path: str, *,
        device: str = "cpu", dtype: str = "float32", seed: int = 0, threads: int = 1,
        total_optimizer_steps: int = 1, gradient_accumulation_steps: int = 1,
        trust_remote_code: bool = False, loss_horizon: int = 0,
    ):
        setup_process(threads, seed)
        self.name, self.rank, self.world_size, self.cfg = name, rank, world_size, cfg
        self.model_path, self.device_kind, self.dtype = model_path, device, dtype
        self.seed, self.trust_remote_code = seed, trust_remote_code
        self.total_optimizer_steps = total_optimizer_steps
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.loss_horizon = loss_horizon  # Dr. GRPO's constant per-row length; 0 = the padded width
        self.engine = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, rank {self.rank}/{self.world_size})"

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def address(self) -> tuple[str, int]:
        """Where this rank (rank 0) hosts the group's rendezvous: a store it holds open."""
        host = node_ip()
        self._world_store = host_store(host, self.world_size)
        return host, self._world_store.port

    def init(self, master_addr: str, master_port: int) -> None:
        import deepspeed
        from transformers import get_scheduler

        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
        )
        backend = "nccl" if self.device_kind == "cuda" else "gloo"
        store = self._world_store if self.rank == 0 else join_store(master_addr, master_port, self.world_size)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)
        skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend)  # adopts the default group above
        self.device = device_for(self.device_kind)
        model = self.build_model().to(self.device)
        optimizer = GuardedAdamW(
            [p for p in model.parameters() if p.requires_grad], lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay, betas=(0.9, 0.95),
        )
        scheduler = get_scheduler(
            self.cfg.lr_schedule, optimizer, num_warmup_steps=self.cfg.warmup_steps,
            num_training_steps=max(self.total_optimizer_steps, 1),
        )
        config = deepspeed_config(self.cfg, self.gradient_accumulation_steps, self.dtype)
        self.guard = optimizer
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )

    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients: by DeepSpeed's own overflow check
        (ZeRO 1/2 run it even in fp32) or by ``GuardedAdamW`` where DeepSpeed has none."""
        return self.guard.skipped + int(getattr(self.engine, "skipped_steps", 0))

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def train_on(self, exp: Experience, loss_fn: LossFn, epochs: int, minibatches: int) -> dict[str, float]:
        """``epochs`` shuffled passes over this rank's shard, ``minibatches`` optimizer steps each.

        Metrics are this rank's share of each minibatch's value times the world size, so the
        group's mean over ranks is the full-minibatch value; averaged over the optimizer steps.
        Keys with a ``/`` (e.g. ``rollout/is_weight_mean``) are not prefixed with the role."""
        maybe_fail(self.name, "train")
        self.engine.train()
        exp = exp.to(self.device)
        if exp.valid is None:
            exp = replace(exp, valid=torch.ones(len(exp), device=self.device))
        n = len(exp)
        size = n // minibatches
        generator = torch.Generator().manual_seed(self.seed + self.engine.global_steps)
        sums: dict[str, float] = defaultdict(float)
        skipped_before = self.skipped_steps()
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for k in range(minibatches):
                minibatch = exp.select(order[k * size : (k + 1) * size].to(self.device))
                for key, v in self._minibatch_step(minibatch, loss_fn).items():
                    sums[key] += v
        steps = epochs * minibatches
        out = {(k if "/" in k else f"{self.role}/{k}"): v / steps for k, v in sums.items()}
        out[f"{self.role}/lr"] = self.scheduler.get_last_lr()[0]
        out[f"{self.role}/nonfinite_steps"] = float(self.skipped_steps() - skipped_before)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            out[f"{self.role}/grad_norm"] = float(grad_norm)
        return out

    def _minibatch_step(self, minibatch: Experience, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on one minibatch, in micro-batches, with the FULL minibatch's loss.

        Each micro-batch's loss is its share of the minibatch loss (``LossNormalizer`` counts
        all-reduced over the ranks), so the shares add up to the full-minibatch loss. DeepSpeed
        divides every micro-batch loss by ``gradient_accumulation_steps`` and averages gradients
        over ranks; multiplying by both undoes that exactly, whatever the number of micro-batches
        (which may differ per rank under a token budget: short ranks run empty fillers, and the
        accumulation boundary is set explicitly)."""
        mask = minibatch.response_mask * minibatch.valid[:, None]
        local = LossNormalizer.of(mask)
        groups = micro_plan(minibatch, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)
        tokens, rows, count = self._all_reduce([local.tokens, local.rows], [float(len(groups))])
        norm = LossNormalizer(tokens, rows, self.loss_horizon or minibatch.response_mask.shape[1])
        scale = self.engine.gradient_accumulation_steps() * self.world_size
        parts = micro_batches(minibatch, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch,
                              min_count=int(count))
        sums: dict[str, float] = defaultdict(float)
        for i, (_, batch) in enumerate(parts):
            self.engine.set_gradient_accumulation_boundary(i == len(parts) - 1)
            loss, metrics = loss_fn(batch, norm)
            self.engine.backward(loss * scale)
            self.engine.step()
            for k, v in metrics.items():
                sums[k] += float(v)
            sums["loss"] += float(loss.detach())
        return {k: v * self.world_size for k, v in sums.items()}

    def _all_reduce(self, sums: list[float], maxes: list[float]) -> list[float]:
        """``sums`` summed and ``maxes`` maximised over the ranks of this world."""
        if not dist.is_initialized() or self.world_size == 1:
            return sums + maxes
        out = []
        for values, op in ((sums, dist.ReduceOp.SUM), (maxes, dist.ReduceOp.MAX)):
            if values:  # every rank passes the same lists, so every rank makes the same calls
                t = torch.tensor(values, dtype=torch.float64, device=self.device)
                dist.all_reduce(t, op=op)
                out += t.tolist()
        return out

    def forward_batched(self, fn, exp: Experience) -> torch.Tensor:
        """``forward.batched`` with this rank's micro-batch settings; under ZeRO-3 every rank runs
        as many forwards as the busiest (parameters are gathered collectively in each)."""
        count = 0
        if self.cfg.zero_stage == 3:
            own = len(micro_plan(exp, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch))
            count = int(self._all_reduce([], [float(own)])[0])
        return batched(fn, exp, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch, count)

    def full_state(self):
        """Context manager gathering ZeRO-3 shards so ``self.engine.module`` holds full weights."""
        import contextlib

        import deepspeed

        if self.cfg.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def save_hf(self, path: str) -> None:
        """Save the full model in Hugging Face format (safetensors); rank 0 writes."""
        with self.full_state():
            if self.rank == 0:
                state = {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}
                self.engine.module.save_pretrained(path, state_dict=state)  # safetensors (transformers 5)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, LR schedule; every rank writes its shards)
        plus this rank's RNG states."""
        self.engine.save_checkpoint(path, tag="ds", save_latest=False)
        Path(path, f"rng_rank{self.rank}.json").write_text(json.dumps(rng_state()))

    def load_checkpoint(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(
            path, tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"{self!r}: no DeepSpeed checkpoint in {path}")
        set_rng_state(json.loads(Path(path, f"rng_rank{self.rank}.json").read_text()))

    def parameter_checksum(self) -> float:
        """Sum of all full weights (a cheap 'did the weights change' probe)."""
        with self.full_state():
            return float(sum(p.detach().double().sum() for p in self.engine.module.parameters()))


def rng_state() -> dict:
    """Python, numpy and torch RNG states as JSON-able data (no pickles in checkpoints)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_py = random.getstate()
    return {
        "python": [version, list(state), gauss_py],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(s: dict) -> None:
    import numpy as np

    version, state, gauss_py = s["python"]
    random.setstate((version, tuple(state), gauss_py))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
