"""Runs that tests of several modules check: built once per session."""

from __future__ import annotations

import pytest

from tests.conftest import compose

# 2 engines, 2 ZeRO-2 policy ranks, 2 critic ranks, a reference and a reward worker (the default
# on a machine of 16+ cores; set here so every multi-worker path runs), PPO, a checkpoint every
# 2 steps
TWO_OF_EACH = ["trainer.total_steps=4", "trainer.save_every=2", "rollout.num_engines=2", "policy.num_ranks=2",
               "critic.num_ranks=2", "cluster.threads_per_worker=1"]


@pytest.fixture(scope="session")
def ppo_two_of_each(ray_cluster, tmp_path_factory, cache_dir):
    """``(run_dir, summary)`` of a straight 4-step run with ``TWO_OF_EACH``: tests/e2e/test_ppo.py
    checks the run, tests/e2e/test_faults.py resumes from its step-2 checkpoint."""
    from rlhf_ray.train import run

    run_dir = tmp_path_factory.mktemp("ppo_two_of_each")
    cfg = compose([f"trainer.output_dir={run_dir}", f"model.cache_dir={cache_dir}", *TWO_OF_EACH])
    return run_dir, run(cfg, run_dir)
