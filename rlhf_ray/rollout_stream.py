"""The prompt stream between the sampler and the learner: submits rollout batches to the engines
(one call per engine), scores each engine's completions as soon as they arrive (streaming
rewards, with ``max_staleness > 0``; the synchronous step scores its batch in one call, as it
always did: a remote judge with a per-request latency would otherwise cost more), re-issues an engine's share after Ray restarted it, and hands the learner whole,
scored batches in order.

With ``trainer.max_staleness = k`` up to ``k + 1`` batches are in flight (the ``RolloutBuffer``
bound), each asking for weights the ``VersionLedger`` allows; ``k = 0`` is the synchronous step:
one batch, submitted and taken at once. A checkpoint records the in-flight batches (prompt
indices, seeds, version floor) so a resume re-issues exactly them: no prompt lost or repeated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray

from rlhf_ray.batch import RolloutSample
from rlhf_ray.calls import Pending, WorkerError, wait_all
from rlhf_ray.groups import chunks
from rlhf_ray.metrics import set_samples_in_flight
from rlhf_ray.staleness import RolloutBuffer, VersionLedger

log = logging.getLogger(__name__)


@dataclass
class Part:
    """One engine's share of a batch."""

    engine: int
    rows: slice  # the batch's prompts this engine generates
    generate: Pending
    samples: list[RolloutSample] | None = None  # prompt_index counts within the batch
    reward: Pending | None = None
    prompts: list[str] = field(default_factory=list)  # prompt text of each sample
    texts: list[str] = field(default_factory=list)  # decoded completion of each sample


@dataclass
class Batch:
    indices: list[int]  # dataset prompt indices, in order
    seed: int
    min_version: int  # oldest weights allowed to generate it
    parts: list[Part] = field(default_factory=list)
    repairs: int = 0

    def describe(self) -> dict:
        return {"indices": self.indices, "seed": self.seed, "min_version": self.min_version}


@dataclass
class Taken:
    """A whole batch for the learner: samples in prompt order, and their rewards (being scored:
    ``scores()`` waits for them, so the learners' forwards can start first)."""

    samples: list[RolloutSample]
    prompts: list[str]  # the prompt text of each sample
    completions: list[str]
    rewards: list[Pending]  # the reward calls, in sample order
    min_version: int
    indices: list[int]  # dataset prompt indices of the batch

    def scores(self) -> dict[str, list[float]]:
        """``{"reward": [...], ...}`` of every sample, in order (waits for the reward calls)."""
        merged: dict[str, list[float]] = {}
        for result in wait_all(self.rewards):
            for k, v in result.items():
                merged.setdefault(k, []).extend(v)
        return merged


class RolloutStream:
    def __init__(self, rollout, reward, sync, tokenizer, prompts: list[str], prompt_ids: list[list[int]], *,
                 samples_per_prompt: int, max_staleness: int, chunk_tokens: int, max_repairs: int, wait_s: float):
        self.rollout, self.reward, self.sync, self.tokenizer = rollout, reward, sync, tokenizer
        self.prompts, self.prompt_ids = prompts, prompt_ids
        self.buffer: RolloutBuffer[Batch] = RolloutBuffer(max_staleness)
        self.ledger = VersionLedger(max_staleness)
        self.asynchronous = max_staleness > 0
        # synchronous: one plain generate call per engine, failing at once on stale weights
        self.chunk_tokens = chunk_tokens if self.asynchronous else 0
        self.wait_s = wait_s if self.asynchronous else 0.0
        self.max_repairs, self.samples_per_prompt = max_repairs, samples_per_prompt

    # ------------------------------------------------------------------ producing
    def submit(self, indices: list[int], seed: int, learner_version: int, min_version: int | None = None) -> Batch:
        """Queue a batch (the buffer must have room); engines generate it from weights the
        ledger allows (or ``min_version`` when re-issued from a checkpoint)."""
        ahead = len(self.buffer)
        floor = self.ledger.min_version(learner_version, ahead) if min_version is None else min_version
        batch = Batch(list(indices), seed, floor)
        ids = [self.prompt_ids[i] for i in indices]
        for engine, rows in enumerate(chunks(len(ids), len(self.rollout.workers))):
            batch.parts.append(Part(engine, rows, self._generate(engine, batch, rows, ids)))
        self.buffer.put(batch)
        self._gauge()
        return batch

    def _generate(self, engine: int, batch: Batch, rows: slice, ids: list[list[int]]) -> Pending:
        return self.rollout.submit_generate(engine, ids[rows], list(range(rows.start, rows.stop)), seed=batch.seed,
                                            min_version=batch.min_version, chunk_tokens=self.chunk_tokens,
                                            wait_s=self.wait_s)

    def poll(self, repair: bool = True) -> None:
        """Collect every engine share that finished and send it to the reward workers;
        ``repair=False`` leaves failed shares for later (the learner is mid-update, so its
        weights are not the version a repaired engine must get)."""
        for batch in self.buffer:
            for part in batch.parts:
                if part.samples is None and part.generate.done():
                    self._collect(batch, part, repair)

    def _collect(self, batch: Batch, part: Part, repair: bool) -> None:
        try:
            part.samples = part.generate.result()
        except WorkerError as e:  # the engine died (Ray restarts it with initial weights) or was stale
            if not repair:
                return
            if batch.repairs >= self.max_repairs:
                raise
            batch.repairs += 1
            log.warning("rollout failed (%s); repairing engines and re-issuing %s's share", e,
                        self.rollout.names[part.engine])
            self.sync.repair(self.sync.latest)
            # same prompts, same seeds: the re-issued share replaces the lost one exactly
            part.generate = self._generate(part.engine, batch, part.rows, [self.prompt_ids[i] for i in batch.indices])
            return
        part.prompts = [self.prompts[batch.indices[s.prompt_index]] for s in part.samples]
        part.texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in part.samples]
        if self.asynchronous:
            part.reward = self.reward.submit_score(part.prompts, part.texts)

    # ------------------------------------------------------------------ consuming
    def take(self) -> Taken:
        """The oldest batch, generated (waits for it, scoring shares as they come); its rewards
        may still be being scored (``Taken.scores``)."""
        batch = self.buffer.peek()
        while any(p.samples is None for p in batch.parts):
            self.poll()
            waiting = [r for p in batch.parts if p.samples is None for r in p.generate.refs]
            if waiting:
                ray.wait(waiting, num_returns=1, timeout=1.0)
        if self.asynchronous:
            rewards = [p.reward for p in batch.parts]
        else:
            rewards = [self.reward.submit_score([x for p in batch.parts for x in p.prompts],
                                                [x for p in batch.parts for x in p.texts])]
        self.buffer.pop()
        self._gauge()
        return Taken([s for p in batch.parts for s in p.samples], [x for p in batch.parts for x in p.prompts],
                     [x for p in batch.parts for x in p.texts], rewards, batch.min_version, batch.indices)

    def wait(self, pending: list[Pending | None]) -> list:
        """Results of learner calls; while they run, finished engine shares get scored."""
        refs = [r for p in pending if p is not None for r in p.refs]
        while refs and ray.wait(refs, num_returns=len(refs), timeout=0.05)[1]:
            self.poll(repair=False)
        return wait_all(pending)

    # ------------------------------------------------------------------ state
    def in_flight(self) -> list[dict]:
        """The batches submitted but not yet trained on (for the checkpoint)."""
        return [b.describe() for b in self.buffer]

    def samples_in_flight(self) -> int:
        """Completions being generated right now (submitted, not back yet)."""
        return sum(p.rows.stop - p.rows.start for b in self.buffer for p in b.parts if p.samples is None) \
            * self.samples_per_prompt

    def _gauge(self) -> None:
        set_samples_in_flight(self.samples_in_flight())
