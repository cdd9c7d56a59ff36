"""Never lose a run, on the real stack with the tiny model: resume equals a straight run, a
SIGKILL while writing a checkpoint loses nothing, killed rollout/reward workers mid-call
neither lose nor duplicate samples, and a dead learner rank restarts the run from the last
checkpoint. Faults are injected with ``RLHF_RAY_FAULTS`` (rlhf_ray/faults.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray import checkpoint as ckpt
from rlhf_ray.train import run
from tests.conftest import compose
from tests.e2e.conftest import TWO_OF_EACH

pytestmark = pytest.mark.e2e


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(run_dir: Path, cache_dir: Path, overrides: list[str]) -> dict:
    cfg = compose([f"trainer.output_dir={run_dir}", f"model.cache_dir={cache_dir}", *overrides])
    return run(cfg, run_dir)


def test_resume_equals_straight_run(ppo_two_of_each, tmp_path, cache_dir, caplog):
    """A new run resumed from step 2's checkpoint of a straight 4-step run (tests/e2e/conftest.py:
    PPO with two of each worker; the checkpoint copied into a run directory of its own together
    with all four of the straight run's metric rows, as if it had crashed after step 4's rows
    were written but before its checkpoint) drops the rows of the steps it redoes and reproduces
    steps 3 and 4 and the final weights. Stopping after a step writes the same checkpoint
    (``trainer.stop_after_steps``): tests/e2e/test_async.py, tests/test_trainer.py."""
    straight, _ = ppo_two_of_each
    resumed = tmp_path / "resumed"
    step2 = ckpt.step_dir(str(straight / "checkpoints"), 2)
    assert ckpt.is_complete(step2)
    shutil.copytree(step2, resumed / "checkpoints" / Path(step2).name)
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    caplog.set_level(logging.INFO, logger="rlhf_ray")
    summary = train(resumed, cache_dir, TWO_OF_EACH)  # resume=auto picks up step 2
    assert f"resumed from {resumed / 'checkpoints' / Path(step2).name} at step 2 (" in caplog.text
    assert summary["steps"] == 4
    a, b = rows(straight), rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # rows 3 and 4 dropped, then written again
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward/mean", "policy/loss", "critic/loss", "kl/mean", "rollout/weight_version"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    wa, wb = load_file(str(straight / "final/model.safetensors")), load_file(str(resumed / "final/model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_sigkill_while_writing_a_checkpoint(ray_cluster, tmp_path, cache_dir):
    """The driver (a process of its own, joined to the session's cluster) dies (SIGKILL) inside
    its 2nd checkpoint: step 2's directory has no marker, the next run resumes from step 1, and
    the run finishes with every step exactly once."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "rlhf_ray.train", f"trainer.output_dir={out}", f"model.cache_dir={cache_dir}",
            "algo=grpo", "rollout.num_engines=1", "policy.num_ranks=1", "trainer.prompts_per_step=8",
            "trainer.total_steps=3", "trainer.save_every=1",
            f"cluster.address={ray_cluster.get_runtime_context().gcs_address}"]
    env = dict(os.environ, RLHF_RAY_FAULTS="driver@checkpoint#2=kill", RLHF_RAY_FAULTS_DIR=str(tmp_path))
    free = ray_cluster.available_resources().get("CPU", 0)
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=600) == -signal.SIGKILL
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # the dead driver's workers go with it (Ray kills the actors of a dead job) and free their CPUs
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("CPU", 0) < free:
        assert time.monotonic() < deadline, "the killed driver's workers still hold CPUs after 60 s"
        time.sleep(0.5)
    root = out / "checkpoints"
    assert ckpt.is_complete(root / "step_00000001") and not ckpt.is_complete(root / "step_00000002")
    env.pop("RLHF_RAY_FAULTS")
    subprocess.run(args, env=env, check=True, timeout=600, start_new_session=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert [Path(p).name for p in ckpt.checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert not (root / "step_00000001").exists()  # pruned only after newer ones completed
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


class Records(logging.Handler):
    """The ``rlhf_ray`` log records of a run (``caplog`` is per test; the run below is shared)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def faulty_run(ray_cluster, tmp_path_factory, cache_dir):
    """One run with worker faults of both kinds (two tests below check it): rollout-1 exits
    inside its 2nd generate and reward-0 inside its 2nd score (repaired in place: Ray restarts
    them), then policy-1 exits inside its 3rd train call (the run rebuilds every group and
    resumes from the last checkpoint)."""
    faults = tmp_path_factory.mktemp("faults")
    out = faults / "run"
    handler, logger = Records(), logging.getLogger("rlhf_ray")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RLHF_RAY_FAULTS", "rollout-1@generate#2=exit,reward-0@score#2=exit,policy-1@train#3=exit")
            mp.setenv("RLHF_RAY_FAULTS_DIR", str(faults))
            summary = train(out, cache_dir, ["algo=grpo", "rollout.num_engines=2", "policy.num_ranks=2",
                                             "trainer.prompts_per_step=8", "trainer.total_steps=3",
                                             "trainer.save_every=1"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return summary, rows(out), faults, handler.messages


def test_killed_rollout_and_reward_workers(faulty_run):
    """Ray restarts both; the engine is re-synced to the current weights before it serves
    again; the step is generated again with the same seeds."""
    summary, metric_rows, faults, _ = faulty_run
    assert (faults / "fired-rollout-1@generate#2").exists() and (faults / "fired-reward-0@score#2").exists()
    assert summary["engine_versions"] == {"rollout-0": 3, "rollout-1": 3}
    for r in metric_rows:
        assert r["rollout/samples"] == 8 * 4  # prompts x samples: none lost, none duplicated
        assert r["sync/check_logprob_diff"] < 1e-4


def test_dead_learner_rank_restarts_from_checkpoint(faulty_run):
    summary, metric_rows, faults, log = faulty_run
    assert (faults / "fired-policy-1@train#3").exists()
    restarts = [i for i, m in enumerate(log) if "restarting all groups" in m]
    assert len(restarts) == 1 and "policy-1" in log[restarts[0]], log  # the failure names the rank
    assert any(m.startswith("resumed from ") for m in log[restarts[0]:]), log  # from the last checkpoint
    assert summary["steps"] == 3 and summary["weight_version"] == 3
    assert [r["step"] for r in metric_rows] == [1, 2, 3]
