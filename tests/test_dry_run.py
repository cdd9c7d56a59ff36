"""The resource plan and ``dry_run=true`` without a cluster (fast, no workers): per-role bundles
with node resources, the fit check per node, and a Hydra ``-m`` sweep whose jobs each get their
own run directory. (``dry_run`` against real clusters: tests/e2e/test_multinode.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf_ray.placement import ROLE_NODE_RESOURCE, check_fits, format_plan, plan_totals, resource_plan
from tests.conftest import compose

REPO = Path(__file__).resolve().parents[1]


def train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "rlhf_ray.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_node_resources_pin_roles_to_node_types():
    plan = {r.role: r for r in resource_plan(compose(["cluster.node_resources=true", "algo=ppo", "rollout.num_engines=2",
                                                      "policy.num_ranks=2", "critic.num_ranks=2"]))}
    assert plan["rollout"].bundle() == {"CPU": 1.0, "rollout_node": 1.0}
    for role in ("policy", "critic", "reference", "reward"):
        assert plan[role].bundle()["learner_node"] == 1.0
    assert set(ROLE_NODE_RESOURCE) == set(plan) | {"reward_model"}  # reward_model: with feedback.enabled
    totals = plan_totals(list(plan.values()))
    assert totals["rollout_node"] == 2 and totals["learner_node"] == 6 and totals["CPU"] == 8
    # off by default: bundles ask for CPU (and GPU) only
    assert all(set(r.bundle()) == {"CPU"} for r in resource_plan(compose([])))


def test_gpu_plan_bundles():
    plan = {r.role: r for r in resource_plan(compose(["cluster=gpu", "rollout.tensor_parallel_size=2"]))}
    assert plan["rollout"].bundle() == {"CPU": 1.0, "GPU": 2.0}
    assert plan["policy"].bundle() == {"CPU": 1.0, "GPU": 1.0}
    assert plan["reward"].bundle() == {"CPU": 1.0}  # a rule reward needs no GPU


def test_check_fits_totals_and_per_node():
    plan = resource_plan(compose(["cluster.node_resources=true", "algo=grpo", "rollout.num_engines=2",
                                  "policy.num_ranks=1"]))
    nodes = [{"CPU": 2.0, "rollout_node": 2.0}, {"CPU": 4.0, "learner_node": 4.0}]
    assert check_fits(plan, {"CPU": 6.0, "rollout_node": 2.0, "learner_node": 4.0}, nodes) == []
    problems = check_fits(plan, {"CPU": 6.0, "rollout_node": 1.0, "learner_node": 4.0})
    assert problems == ["cluster: the plan needs 2 rollout_node but the cluster has 1"]
    # enough in total, but no single node holds a rollout bundle (CPU and rollout_node apart)
    split = [{"CPU": 6.0, "learner_node": 4.0}, {"CPU": 0.0, "rollout_node": 2.0}]
    problems = check_fits(plan, {"CPU": 6.0, "rollout_node": 2.0, "learner_node": 4.0}, split)
    assert problems == ["cluster: no node can hold one rollout bundle {'CPU': 1.0, 'rollout_node': 1.0}"]


def test_format_plan_shows_bundles_and_strategy():
    text = format_plan(resource_plan(compose(["cluster.node_resources=true", "cluster.placement_strategy=SPREAD",
                                              "rollout.num_engines=2", "policy.num_ranks=2", "critic.num_ranks=2"])))
    assert "2 x {CPU: 1, rollout_node: 1}" in text and "SPREAD" in text
    assert text.splitlines()[-1].endswith("rollout_node: 2, learner_node: 6")


def test_dry_run_prints_plan_without_cluster(tmp_path):
    out = train_cli("dry_run=true", "cluster.node_resources=true", "rollout.num_engines=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rollout          2" in out.stdout and "learner_node: 1" in out.stdout
    assert "not checked against a cluster" in out.stdout
    assert f"run directory: {tmp_path / 'run'}" in out.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sweep_gives_each_job_its_own_dir(tmp_path):
    """``-m`` runs each combination as its own job, in ``hydra.sweep.dir/<job number>``; an
    explicit ``trainer.output_dir`` gets the job number appended, so runs never share a dir."""
    sweep, out = tmp_path / "sweep", tmp_path / "runs"
    result = train_cli("-m", "dry_run=true", "rollout.num_engines=1,2", f"hydra.sweep.dir={sweep}", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, engines in ((0, 1), (1, 2)):
        overrides = yaml.safe_load((sweep / str(job) / ".hydra" / "overrides.yaml").read_text())
        assert f"rollout.num_engines={engines}" in overrides
        assert f"run directory: {sweep / str(job)}" in result.stdout
        assert f"rollout          {engines}" in result.stdout
    result = train_cli("-m", "dry_run=true", "policy.num_ranks=1,2", f"trainer.output_dir={out}",
                       f"hydra.sweep.dir={sweep}-2", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run directory: {out / '0'}" in result.stdout and f"run directory: {out / '1'}" in result.stdout
