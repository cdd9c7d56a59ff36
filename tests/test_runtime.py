"""How every entry point joins Ray and picks its run directory (rlhf_ray/runtime.py), checked
without starting Ray: ``ray.init`` is replaced by a recorder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from rlhf_ray import runtime
from rlhf_ray.config import ClusterConfig
from rlhf_ray.placement import RolePlan

PACKAGE = Path(runtime.__file__).parent


class FakeRay:
    def __init__(self, cpus: float = 8):
        self.calls: list[dict] = []
        self.cpus, self.up = cpus, False

    def init(self, **kwargs):
        self.calls.append(kwargs)
        self.up = True

    def is_initialized(self):
        return self.up

    def cluster_resources(self):
        return {"CPU": self.cpus, **(self.calls[-1].get("resources") or {})}

    def nodes(self):
        return [{"Alive": True, "Resources": self.cluster_resources()}]

    def shutdown(self):
        self.up = False


@pytest.fixture
def fake_ray(monkeypatch):
    fake = FakeRay()
    monkeypatch.setattr(runtime, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return fake


def plan(role: str, workers: int, node_resource: str = "") -> list[RolePlan]:
    return [RolePlan(role, workers, 1.0, 0, "PACK", node_resource)]


def test_a_local_cluster_is_new_never_a_stray_one(fake_ray):
    assert runtime.connect(ClusterConfig(num_cpus=3), plan("sft", 2)) is True
    (call,) = fake_ray.calls
    assert call["address"] == "local" and call["num_cpus"] == 3 and call["dashboard_host"] == "127.0.0.1"


def test_an_address_is_joined_and_not_stopped_by_the_caller(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert runtime.connect(ClusterConfig(), plan("sft", 2)) is False
    assert fake_ray.calls == [{"address": "127.0.0.1:6379", "namespace": "rlhf_ray", "log_to_driver": True}]
    fake_ray.up = False
    runtime.connect(ClusterConfig(address="10.0.0.1:6379"), plan("sft", 2))  # cluster.address wins
    assert fake_ray.calls[-1]["address"] == "10.0.0.1:6379"


def test_stages_in_turn_get_a_cluster_for_the_largest(fake_ray):
    # stages run one after the other: CPUs for the largest (6, not 2 + 6 + 3), and node resources
    # for every plan (the PPO stage's rollout_node bundles)
    runtime.connect(ClusterConfig(num_cpus=0), plan("sft", 2), plan("ppo", 6, "rollout_node"), plan("eval", 3))
    call = fake_ray.calls[0]
    assert call["resources"] == {"rollout_node": 6.0}
    assert call["num_cpus"] == max(6, os.cpu_count() or 1)


def test_a_plan_that_does_not_fit_names_the_shortfall(fake_ray):
    fake_ray.cpus = 2
    with pytest.raises(RuntimeError, match="needs 5 CPU but the cluster has 2"):
        runtime.connect(ClusterConfig(address="127.0.0.1:1"), plan("ppo", 5))


def test_only_runtime_calls_ray_init():
    """One way to join Ray: no other module of the package calls ``ray.init``."""
    callers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if re.search(r"\bray\.init\(", p.read_text()) and p.name != "runtime.py")
    assert callers == []


def test_run_dir_outside_hydra():
    assert runtime.run_dir("/tmp/x") == Path("/tmp/x")
    assert runtime.run_dir("") == Path("outputs/run")


def test_openmp_threads_sleep_where_workers_overlap_and_spin_briefly_where_they_do_not(monkeypatch):
    from rlhf_ray.config import Config
    from rlhf_ray.stage import worker_env as stage_env

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(key, raising=False)
    rl = runtime.worker_env(Config())  # RL run (and evaluation): roles compute on the same cores at once
    assert rl["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in rl
    supervised = stage_env(ClusterConfig(), overlapping=False)  # SFT / reward-model ranks
    assert supervised["GOMP_SPINCOUNT"] == runtime.OMP_SPIN_COUNT and "OMP_WAIT_POLICY" not in supervised
    assert supervised["OMP_NUM_THREADS"] == rl["OMP_NUM_THREADS"] == str(ClusterConfig().threads_per_worker)

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the driver's own choice wins everywhere
    for env in (runtime.worker_env(Config()), stage_env(ClusterConfig(), overlapping=False)):
        assert env["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in env
    gpu = runtime.worker_env(Config(cluster=ClusterConfig(device="cuda")))
    assert "OMP_WAIT_POLICY" not in gpu and "GOMP_SPINCOUNT" not in gpu


START_UP = """
import gc, os, subprocess, sys
import rlhf_ray
print(gc.isenabled(), "RLHF_RAY_START_UP_GC" in os.environ)
import torch  # the worker's stack, imported with the GC off
from rlhf_ray.workers.common import started_up
started_up()
print(gc.isenabled(), gc.get_freeze_count() > 0)
print(subprocess.run([sys.executable, "-c", "import gc, rlhf_ray; print(gc.isenabled())"],
                     capture_output=True, text=True, check=True).stdout.strip())
"""


@pytest.mark.parametrize("flag,before,after", [("off", "False", "True True"), ("", "True", "True False")])
def test_a_workers_gc_rests_while_it_imports_and_is_back_once_started(flag, before, after):
    """Workers are spawned with RLHF_RAY_START_UP_GC=off (rlhf_ray.groups): importing the package
    turns the GC off and drops the variable, so processes the worker spawns start as usual;
    ``started_up`` freezes the start-up heap and turns the GC on. Without the variable (a driver,
    a user's script) nothing changes, nothing is frozen. Every worker of a real run:
    tests/e2e/test_async.py."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RLHF_RAY_START_UP_GC"}
    if flag:
        env["RLHF_RAY_START_UP_GC"] = flag
    out = subprocess.run([sys.executable, "-c", START_UP], env=env, capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.split("\n")
    assert out[:3] == [f"{before} False", after, "True"], out
