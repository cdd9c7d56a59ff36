"""A Hydra ``-m`` sweep of real training runs in one process: each job starts its own local Ray
cluster (the previous one was shut down), writes its own run directory and metrics, and the
scaling knob of each job is the one it ran with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]


def test_multirun_scaling_sweep(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.train", "-m", "algo=grpo", "rollout.num_engines=1", "policy.num_ranks=1,2",
         "policy.micro_batch_size=4", "trainer.total_steps=1", "trainer.prompts_per_step=4", "algo.epochs=1",
         "rollout.max_new_tokens=6", f"model.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=360,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert out.stderr.count("Started a local Ray instance") == 2, "each job starts (and stops) its own cluster"
    for job, ranks in ((0, 1), (1, 2)):
        run = sweep / str(job)
        assert f"policy.num_ranks={ranks}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert json.loads((run / "config.json").read_text())["policy"]["num_ranks"] == ranks
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1] and rows[0]["rollout/weight_version"] == 1.0
        assert json.loads((run / "summary.json").read_text())["steps"] == 1
