"""The actor-learner control flow without Ray: ``Trainer`` with ``trainer.max_staleness`` driven
by in-process stand-ins of the groups (``submit_*`` answer at once with ``calls.Ready``). The
stand-in engines generate when a share is submitted, from the weights they hold then, and
refuse a share whose version floor they do not hold (the real engine would wait). What is
checked is what the controller decides: how many batches are in flight, which version floor
each asks for, the per-token staleness it measures, the skipped old-logprob pass, what a
checkpoint records and a resume re-issues, and the re-issue of a share lost with an engine.
The real stack runs the same in tests/e2e/test_async.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlhf_ray.batch import RolloutSample
from rlhf_ray.calls import Ready, WorkerError
from rlhf_ray.models.tokenizer import build_char_tokenizer
from rlhf_ray.runtime import Groups
from rlhf_ray.trainer import Trainer
from tests.conftest import compose
from tests.fakes import PROMPTS, Failed, FakePolicy, FakeReference, FakeReward, FakeRollout
from tests.fakes import RESPONSE_LEN as LEN


class Engines(FakeRollout):
    """One share per engine (FakeRollout answers for both at once); versions, weight loads and
    spot checks as FakeRollout's."""

    def __init__(self):
        self.names = ["rollout-0", "rollout-1"]
        self.workers = list(self.names)
        self.held = dict.fromkeys(self.names, 0)
        self.floors: list[int] = []  # min_version of every share submitted
        self.fail_next = 0
        self.fail_busy = 0

    def submit_generate(self, engine, prompt_ids, prompt_indices, *, seed, min_version, n=None, chunk_tokens=0,
                        wait_s=0.0):
        name = self.names[engine]
        self.floors.append(min_version)
        if self.fail_next:
            self.fail_next -= 1
            self.held[name] = 0  # Ray restarts it with the initial weights
            return Failed(WorkerError("rollout.generate failed on 'rollout-1': the actor died"))
        assert self.held[name] >= min_version, f"{name} asked for v{min_version}, holds v{self.held[name]}"
        out = []
        for ids, i in zip(prompt_ids, prompt_indices, strict=True):
            rng = random.Random(seed + i)
            for _ in range(n or 2):
                v = self.held[name]
                out.append(RolloutSample(i, list(ids), [rng.randrange(4, 30) for _ in range(LEN)], [-1.5] * LEN, v,
                                         name, "length", [v] * LEN))
        return Ready(out)

    def busy_seconds(self):
        if self.fail_busy:
            self.fail_busy -= 1
            raise WorkerError("rollout.busy_seconds failed on 'rollout-1': the actor is restarting")
        return [0.0, 0.0]


def fit(tmp_path: Path, *overrides: str, engines: Engines | None = None, policy: FakePolicy | None = None):
    cfg = compose(["algo=grpo", "rollout.n_samples_per_prompt=2", "trainer.prompts_per_step=2",
                   "policy.num_ranks=1", "policy.micro_batch_size=2", "sync.backend=object_store",
                   "sync.check_samples=2", "trainer.total_steps=6", f"trainer.output_dir={tmp_path}", *overrides])
    tok = build_char_tokenizer()
    engines, policy = engines or Engines(), policy or FakePolicy()
    groups = Groups(engines, FakeReward(), FakeReference(), policy, None)
    trainer = Trainer(cfg, groups, tok, PROMPTS, [tok.encode(p) for p in PROMPTS], tmp_path)
    summary = trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, engines, policy


def test_synchronous_is_on_policy_and_skips_the_redundant_pass(tmp_path):
    _, rows, engines, policy = fit(tmp_path, "trainer.max_staleness=0", "algo.epochs=1", "algo.minibatches=1")
    assert [r["rollout/staleness_max"] for r in rows] == [0.0] * 6
    assert engines.floors == [v for v in range(6) for _ in range(2)]  # every share: the current weights
    assert policy.old_logprob_passes == 0 and len(policy.updates) == 6
    assert all("rollout/behavior_logprob_diff" not in r for r in rows)


def test_old_logprob_pass_runs_when_it_is_not_the_updates_forward(tmp_path):
    _, _, _, policy = fit(tmp_path / "a", "trainer.max_staleness=0", "algo.epochs=2", "algo.minibatches=1")
    assert policy.old_logprob_passes == 6
    # one epoch, one minibatch, but off-policy data (max_staleness=1): computed too
    _, rows, _, policy = fit(tmp_path / "b", "trainer.max_staleness=1", "algo.epochs=1", "algo.minibatches=1")
    stale = sum(r["rollout/staleness_max"] > 0 for r in rows)
    assert stale == 5 and policy.old_logprob_passes == stale


@pytest.mark.parametrize("k", [1, 2])
def test_bounded_staleness(tmp_path, k):
    summary, rows, engines, _ = fit(tmp_path, f"trainer.max_staleness={k}")
    lags = [r["rollout/staleness_max"] for r in rows]
    # the pipeline fills with batches of the initial weights, then every batch lags exactly k
    assert max(lags) == k and lags[-1] == k and all(0 <= x <= k for x in lags)
    assert all(r["rollout/dropped_samples"] == 0 for r in rows)
    assert [r["rollout/buffer_fill"] for r in rows] == [1.0] * 6  # k + 1 batches in flight
    assert summary["weight_version"] == 6 and set(summary["engine_versions"].values()) == {6}


def test_resume_reissues_the_batches_in_flight(tmp_path):
    common = ["trainer.max_staleness=2", "trainer.save_every=2"]
    _, straight, _, _ = fit(tmp_path / "straight", *common)
    first, _, _, _ = fit(tmp_path / "resumed", *common, "trainer.stop_after_steps=3")
    assert first["stopped"]
    state = json.loads((tmp_path / "resumed/checkpoints/step_00000003/driver.json").read_text())
    assert len(state["in_flight"]) == 2  # k batches stay in flight after a step took its own
    _, resumed, _, _ = fit(tmp_path / "resumed", *common)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["rollout/prompt_indices"] for r in resumed] == [r["rollout/prompt_indices"] for r in straight]


def test_share_lost_with_an_engine_is_reissued(tmp_path):
    engines = Engines()
    engines.fail_next = engines.fail_busy = 1  # the restarting engine cannot report its busy seconds either
    summary, rows, engines, _ = fit(tmp_path, "trainer.max_staleness=1", engines=engines)
    assert all(r["rollout/samples"] == 4 for r in rows)  # 2 prompts x 2 samples: none lost
    assert len(engines.floors) == 2 * 7 + 1  # 7 batches submitted (6 trained + 1 in flight), 1 re-issue


def test_sigterm_stops_after_the_step_with_batches_in_flight_checkpointed(tmp_path, monkeypatch):
    import os
    import signal

    real_step = Trainer.step

    def step_then_sigterm(self):
        metrics = real_step(self)
        if self.step_index == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # preemption arrives during step 2's bookkeeping
        return metrics

    monkeypatch.setattr(Trainer, "step", step_then_sigterm)
    summary, rows, _, _ = fit(tmp_path, "trainer.max_staleness=1")
    assert summary["stopped"] and [r["step"] for r in rows] == [1, 2]
    state = json.loads((tmp_path / "checkpoints/step_00000002/driver.json").read_text())
    assert len(state["in_flight"]) == 1 and state["weight_version"] == 2
