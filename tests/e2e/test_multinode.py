"""Multi-node placement on a simulated cluster (``ray.cluster_utils.Cluster``): a head with no
CPUs, a rollout node (``rollout_node``), a learner node (``learner_node``) and a spare node with
neither. With ``cluster.node_resources=true`` the engines must land on the rollout node and the
learner/critic/reference/reward workers on the learner node (none on the spare node, although it
has free CPUs), and one full PPO step must run across them. ``dry_run`` against the same cluster
prints each node and rejects a plan that needs more ``rollout_node`` than the cluster has.

The cluster and its driver run in a child process (this file, run as a script): the test
session may already hold a Ray connection (tests/conftest.py), and one process has one driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.local_net import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
NODES = {  # name -> add_node kwargs (labels are informational; placement uses the resources)
    "rollout": dict(num_cpus=1, resources={"rollout_node": 1}, labels={"rlhf-ray/node-type": "rollout"}),
    "learner": dict(num_cpus=4, resources={"learner_node": 4}, labels={"rlhf-ray/node-type": "learner"}),
    "spare": dict(num_cpus=2),
}
OVERRIDES = [
    "algo=ppo", "rollout.num_engines=1", "policy.num_ranks=1", "critic.num_ranks=1", "trainer.total_steps=1",
    "trainer.prompts_per_step=4", "algo.epochs=1", "rollout.max_new_tokens=6", "sync.check_samples=2",
    "cluster.node_resources=true",
]


def simulate(out: Path, cache_dir: str) -> None:
    """Child process: build the cluster, dry-run, train one step, record where workers ran."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from rlhf_ray.runtime import dry_run
    from rlhf_ray.train import compose_config, run

    temp_dir = tempfile.mkdtemp(prefix="rm", dir="/tmp")
    result: dict = {"temp_dir": temp_dir}
    out.write_text(json.dumps(result))  # the parent cleans up by temp dir even if we die
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
        dashboard_agent_listen_port=free_port(), temp_dir=temp_dir, object_store_memory=200 * 2**20))
    try:
        ids = {name: cluster.add_node(**kw, object_store_memory=200 * 2**20, temp_dir=temp_dir).node_id for name, kw in NODES.items()}
        cluster.wait_for_nodes()
        result["nodes"] = ids
        common = [*OVERRIDES, f"cluster.address={cluster.address}", f"model.cache_dir={cache_dir}"]
        result["dry_run"] = dry_run(compose_config(common))
        try:
            dry_run(compose_config([*common, "rollout.num_engines=2"]))
        except RuntimeError as e:
            result["dry_run_error"] = str(e)
        run_dir = out.parent / "run"
        summary = run(compose_config([*common, f"trainer.output_dir={run_dir}"]), run_dir)
        result["summary"] = summary
        result["metrics"] = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        actors = list_actors(address=f"http://{cluster.webui_url}" if "://" not in cluster.webui_url
                             else cluster.webui_url, detail=True, limit=1000, raise_on_missing_output=False)
        result["placement"] = {a.name: a.node_id for a in actors if a.name}
    finally:
        out.write_text(json.dumps(result, default=str))
        ray.shutdown()
        cluster.shutdown()


def kill_by_temp_dir(temp_dir: str) -> list[int]:
    """SIGKILL every process whose command line names ``temp_dir`` (ours only)."""
    killed = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if temp_dir.encode() in (p / "cmdline").read_bytes():
                    os.kill(int(p.name), signal.SIGKILL)
                    killed.append(int(p.name))
            except OSError:
                pass
    return killed


def test_roles_land_on_their_node_types(tmp_path, cache_dir):
    out = tmp_path / "result.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, __file__, str(out), str(cache_dir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    finally:
        result = json.loads(out.read_text()) if out.exists() else {}
        if result.get("temp_dir"):
            time.sleep(1)
            kill_by_temp_dir(result["temp_dir"])
            shutil.rmtree(result["temp_dir"], ignore_errors=True)
    assert proc.returncode == 0 and "placement" in result, log[-6000:]

    nodes, placement = result["nodes"], result["placement"]
    expected = {"rollout-0": "rollout", "policy-0": "learner", "critic-0": "learner", "reference-0": "learner",
                "reward-0": "learner"}
    where = {name: next((n for n, i in nodes.items() if i == placement.get(name)), placement.get(name))
             for name in expected}
    assert where == expected, (where, placement)
    assert nodes["spare"] not in placement.values()

    # one full PPO step ran across the nodes and the engine took the new weights
    assert result["summary"]["steps"] == 1
    assert result["summary"]["engine_versions"] == {"rollout-0": 1}
    m = result["metrics"]
    assert m["rollout/weight_version"] == 1.0 and m["critic/loss"] is not None and m["policy/loss"] is not None

    # dry_run checked the plan against this cluster, node by node
    assert "4 alive node(s)" in result["dry_run"] and "the plan fits the cluster" in result["dry_run"]
    assert "rollout_node: 1" in result["dry_run"]
    assert "needs 2 rollout_node but the cluster has 1" in result["dry_run_error"]



@pytest.mark.timeout(1200)
def test_local_multinode_script_with_token_auth(tmp_path, cache_dir):
    """cluster/local_multinode.sh: a head, a rollout node and a learner node on loopback with
    token auth; dry_run validates the node-resource plan against it; requests without the token
    are refused; two jobs submitted in a row with deploy/submit.sh (the README's flow) both
    finish; stop leaves no process of that cluster behind."""
    script = REPO / "cluster" / "local_multinode.sh"
    local_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: unix socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RLHF_LOCAL_DIR=local_dir, RAY=str(Path(sys.executable).with_name("ray")), ROLLOUT_CPUS="1",
               LEARNER_CPUS="4", HEAD_CPUS="1", PYTHONPATH=str(REPO))
    try:
        start = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True, timeout=240)
        assert start.returncode == 0, start.stdout + start.stderr
        cluster_env = dict(env)
        for line in Path(local_dir, "env").read_text().splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            cluster_env[key] = value
        assert cluster_env["RAY_AUTH_MODE"] == "token"
        assert oct(Path(cluster_env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777) == "0o600"
        dry = [sys.executable, "-m", "rlhf_ray.train", "dry_run=true", *OVERRIDES, f"hydra.run.dir={tmp_path}"]
        ok = subprocess.run(dry, env=cluster_env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and "the plan fits the cluster" in ok.stdout, ok.stdout + ok.stderr[-3000:]
        assert "3 alive node(s)" in ok.stdout and "rollout_node: 1" in ok.stdout
        # no token, no cluster: neither the GCS nor the dashboard's job API answer without it
        anonymous = dict(cluster_env, RAY_AUTH_MODE="disabled")
        anonymous.pop("RAY_AUTH_TOKEN_PATH")
        refused = subprocess.run(dry, env=anonymous, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "the plan fits" not in refused.stdout
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(cluster_env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/", timeout=10)
        assert denied.value.code in (401, 403)
        # Two jobs in a row. When every node shared one Ray temp dir, each node's runtime-env agent
        # unpacked the uploaded working_dir into the same directory while the driver imported
        # from it, and the first job died with a ModuleNotFoundError; now each node has its own.
        for i in (1, 2):
            out = tmp_path / f"job{i}"
            job = subprocess.run(
                ["bash", str(REPO / "deploy" / "submit.sh"), *OVERRIDES, f"trainer.output_dir={out}",
                 f"model.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / f'hydra{i}'}"],
                env=cluster_env, cwd=REPO, capture_output=True, text=True, timeout=540)
            logs = job.stdout + job.stderr
            assert job.returncode == 0 and "run finished" in logs, f"job {i}:\n{logs[-6000:]}"
            assert "Started a local Ray instance" not in logs
            summary = json.loads((out / "summary.json").read_text())
            assert summary["steps"] == 1 and summary["engine_versions"] == {"rollout-0": 1}, summary
        # one Ray temp dir per node: head, rollout node 0, learner node 0
        assert sorted(p.parent.name for p in Path(local_dir).glob("*/session_latest")) == ["h", "l0", "r0"]
    finally:
        stop = subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, text=True, timeout=120)
        left = kill_by_temp_dir(local_dir)
        shutil.rmtree(local_dir, ignore_errors=True)
    assert stop.returncode == 0, stop.stderr
    assert not left, f"processes of the local cluster survived stop: {left}"


if __name__ == "__main__":
    simulate(Path(sys.argv[1]), sys.argv[2])
