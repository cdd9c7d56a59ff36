"""Driver side of weight sync: sets up the transport, pushes a weight version to every
engine and checks each reports it, spot-checks vLLM's logprobs against the learner's, and
repairs engines that Ray restarted (they come back holding the initial weights).

A push is two halves: ``start`` hands the weights to the engines (they load them between two
generation chunks, see workers/rollout.py) and ``finish`` waits for every engine to report the
version. The synchronous step does both at once (``push``); with ``trainer.max_staleness > 0``
the trainer finishes a push only before the next one, so the learner does not wait for
engines that are generating. The groups are passed in (``PolicyGroup``, ``RolloutGroup``);
this module imports nothing above ``rlhf_ray.calls``."""

from __future__ import annotations

import logging
import time

from rlhf_ray.batch import RolloutSample, pad_samples
from rlhf_ray.calls import WorkerError, wait
from rlhf_ray.config import SyncConfig
from rlhf_ray.sync.buckets import plan_buckets

log = logging.getLogger(__name__)


class StaleEngineError(RuntimeError):
    """An engine did not report the weight version it was just sent."""


class WeightSync:
    def __init__(self, policy, rollout, cfg: SyncConfig, *, tensor_parallel_size: int, timeout_s: float, pad_id: int):
        self.policy, self.rollout, self.cfg = policy, rollout, cfg
        self.tp, self.timeout_s, self.pad_id = tensor_parallel_size, timeout_s, pad_id
        self.plan = plan_buckets(policy.weight_manifest(), int(cfg.bucket_mb * 2**20))
        self.weight_bytes = sum(m.nbytes for bucket in self.plan for m in bucket)
        self.adapter = policy.adapter_config()  # a PEFT config: the plan is a LoRA adapter's tensors
        self.engine_versions = dict.fromkeys(rollout.names, 0)
        self.inflight: dict | None = None
        self.latest = 0  # the newest version sent (what a repaired engine must get)
        if cfg.backend == "collective":
            self.init_group()

    def init_group(self) -> None:
        """(Re)build the private group: policy rank 0 + every engine worker."""
        world = 1 + len(self.rollout.workers) * self.tp
        host, port = self.policy.weight_group_address(world, self.cfg.timeout_s)
        refs = (self.policy.init_weight_group(world, self.cfg.timeout_s)
                + self.rollout.init_weight_group(host, port, self.tp, self.cfg.timeout_s))
        wait(refs, ["policy-0"] + self.rollout.names, "init weight-sync group", self.timeout_s)

    def push(self, version: int, check: list[RolloutSample] = ()) -> dict[str, float]:
        """Stream the policy's weights to every engine as ``version``; verify every engine has
        it (and, given ``check`` samples, compare vLLM's logprobs with the learner's)."""
        self.start(version, check)
        return self.finish()

    def start(self, version: int, check: list[RolloutSample] = ()) -> None:
        """Send ``version``: returns once the learner has handed the weights over (object store)
        or has queued its send (collective: it completes as the engines join)."""
        if self.inflight is not None:
            raise RuntimeError(f"push of v{self.inflight['version']} not finished before v{version}")
        self.latest = version
        check = list(check)
        sequences = [s.prompt_ids + s.response_ids for s in check] or None
        start = time.perf_counter()
        if self.cfg.backend == "object_store":
            refs = self.policy.get(self.policy.send_weights(self.plan, True), "send_weights")[0]
            send, receive = [], self.rollout.receive_weights(self.plan, version, refs, sequences, self.adapter)
        else:
            send = self.policy.send_weights(self.plan, False)
            receive = self.rollout.receive_weights(self.plan, version, None, sequences, self.adapter)
        # The learner's side of the spot check, from the weights it just sent: queued behind the
        # send on every rank (a rank runs its calls in order, before any later update), so it
        # runs while the engines load the weights instead of before the send.
        learner = self.policy.submit_logprobs_replicated(pad_samples(check, self.pad_id)) if check else None
        self.inflight = {"version": version, "send": send, "receive": receive, "start": start, "check": check,
                         "learner": learner, "handed_over_s": time.perf_counter() - start}

    def finish(self) -> dict[str, float]:
        """Wait for the push in flight (if any); every engine must report its version."""
        p, self.inflight = self.inflight, None
        if p is None:
            return {}
        version, send = p["version"], p["send"]
        if send:  # collective: sender and receivers wait on each other, fail as one
            names = self.policy.names[: len(send)] + self.rollout.names
            answers = wait(send + p["receive"], names, "weight sync", self.timeout_s)[len(send):]
        else:
            answers = self.rollout.get(p["receive"], "receive_weights")
        self.engine_versions = {n: v for n, (v, _) in zip(self.rollout.names, answers, strict=True)}
        stale = [f"{n}=v{v}" for n, v in self.engine_versions.items() if v != version]
        if stale:
            raise StaleEngineError(f"after sync to v{version} engines report {', '.join(stale)}")
        per_engine = {f"rollout/weight_version/{n}": float(v) for n, v in self.engine_versions.items()}
        out = {"rollout/weight_version": float(version), "sync/seconds": time.perf_counter() - p["start"],
               "sync/handover_seconds": p["handed_over_s"], "sync/bytes": float(self.weight_bytes),
               "sync/buckets": float(len(self.plan)), **per_engine}
        if p["check"]:
            learner = p["learner"].result()
            out["sync/check_logprob_diff"] = self._compare(p["check"], learner, [lp for _, lp in answers])
        return out

    def abandon(self) -> None:
        """Forget a push that failed with an engine (repair re-sends the version)."""
        self.inflight = None

    def repair(self, version: int, wait_s: float = 300.0) -> None:
        """Wait for restarted engines to answer, rebuild the transport and re-push ``version``."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                versions = self.rollout.versions(timeout_s=60)
                break
            except WorkerError as e:
                if time.monotonic() > deadline:
                    raise WorkerError(f"rollout engines did not come back within {wait_s:.0f}s: {e}") from e
                time.sleep(2)
        self.abandon()
        log.warning("repairing rollout engines (versions %s) to v%d", dict(zip(self.rollout.names, versions, strict=True)), version)
        if self.cfg.backend == "collective":
            self.init_group()
        self.push(version)

    def _compare(self, samples: list[RolloutSample], learner, engine_logprobs: list) -> float:
        """Max over engines of the mean |vLLM - learner| logprob on the same tokens (new weights)."""
        worst = 0.0
        for per_engine in engine_logprobs:
            diffs = [abs(e - float(learner[i, j])) for i, (s, lps) in enumerate(zip(samples, per_engine, strict=True))
                     for j, e in enumerate(lps[-len(s.response_ids):])]
            worst = max(worst, sum(diffs) / max(len(diffs), 1))
        if worst > self.cfg.logprob_check_tol:
            log.warning("sync/check_logprob_diff %.2e after sync exceeds %.1e", worst, self.cfg.logprob_check_tol)
        return worst
