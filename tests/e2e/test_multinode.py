"""Multi-node placement on a local multi-node cluster (cluster/local_multinode.sh: a head with
one CPU and no node-type resource, a rollout node advertising ``rollout_node`` and a learner
node advertising ``learner_node``, on loopback, with token auth). With
``cluster.node_resources=true`` the engines must land on the rollout node and the
learner/critic/reference/reward workers on the learner node (none on the head, although it has
a free CPU), and a full PPO step must run across them, submitted as a job with deploy/submit.sh.
``dry_run`` against the cluster prints each node and rejects a plan that needs more
``rollout_node`` than the cluster has. Without the token the cluster refuses every client.
The jobs also show what any job on a running cluster must do: its driver joins the cluster
(starts none), its logs (the progress bar included) stream back through the job API, and its
``ray_rlhf_*`` gauges reach the head's metrics endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.local_net import scrape

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "algo=ppo", "rollout.num_engines=1", "policy.num_ranks=1", "critic.num_ranks=1", "trainer.total_steps=1",
    "trainer.prompts_per_step=4", "algo.epochs=1", "rollout.max_new_tokens=6", "sync.check_samples=2",
    "cluster.node_resources=true",
]


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


PLACEMENT = """
import json, os
from ray.util.state import list_actors, list_nodes
address = os.environ["RAY_API_SERVER_ADDRESS"]
nodes = {n.node_id: n.labels.get("rlhf-ray/node-type") for n in list_nodes(address=address, detail=True)}
print(json.dumps([[a.name, a.job_id, nodes.get(a.node_id, a.node_id)]
                  for a in list_actors(address=address, detail=True, limit=1000) if a.name]))
"""


class GaugeWatcher:
    """Scrapes a metrics endpoint every 0.25 s while in its ``with`` block: ``seen`` once the
    driver's ``ray_rlhf_step`` gauge was there (Ray drops a dead worker's series at its next
    report, so the series exists only while the driver runs)."""

    def __init__(self, port: int):
        self.port, self.seen, self._done = port, False, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.is_set() and not self.seen:
            self.seen = "ray_rlhf_step{" in scrape(self.port)
            self._done.wait(0.25)

    def __enter__(self) -> GaugeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=10)


def run_all(commands: dict[str, tuple[list[str], dict]], timeout: float) -> dict[str, subprocess.CompletedProcess]:
    """Each ``name -> (argv, env)`` as a process in REPO, all started at once; their results."""
    procs = {name: subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, env) in commands.items()}
    done = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=timeout)
        done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


@pytest.mark.timeout(1200)
def test_local_multinode_script_with_token_auth(tmp_path, cache_dir):
    """cluster/local_multinode.sh: a head, a rollout node and a learner node on loopback with
    token auth; dry_run validates the node-resource plan against it; requests without the token
    are refused; two jobs submitted in a row with deploy/submit.sh (the README's flow) both
    finish, each joining the cluster with every role on its node type, its logs (progress bar
    included) streamed back and its gauges on the head's metrics endpoint; stop leaves no
    process of that cluster behind."""
    script = REPO / "cluster" / "local_multinode.sh"
    local_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: unix socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RLHF_LOCAL_DIR=local_dir, RAY=str(Path(sys.executable).with_name("ray")), ROLLOUT_CPUS="1",
               LEARNER_CPUS="4", HEAD_CPUS="1", PYTHONPATH=str(REPO),
               RAY_metrics_report_interval_ms="1000")  # the driver's gauges reach the endpoint within 1 s
    try:
        start = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True, timeout=240)
        assert start.returncode == 0, start.stdout + start.stderr
        cluster_env = dict(env)
        for line in Path(local_dir, "env").read_text().splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            cluster_env[key] = value
        assert cluster_env["RAY_AUTH_MODE"] == "token"
        assert oct(Path(cluster_env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777) == "0o600"
        # no token, no cluster: neither the GCS nor the dashboard's job API answer without it
        anonymous = dict(cluster_env, RAY_AUTH_MODE="disabled", RAY_gcs_server_port_wait_time_s="1")  # one try
        anonymous.pop("RAY_AUTH_TOKEN_PATH")
        dry = [sys.executable, "-m", "rlhf_ray.train", "dry_run=true", *OVERRIDES]
        runs = run_all({
            "fits": ([*dry, f"hydra.run.dir={tmp_path / 'd1'}"], cluster_env),
            "too_big": ([*dry, "rollout.num_engines=2", f"hydra.run.dir={tmp_path / 'd2'}"], cluster_env),
            "refused": ([*dry, f"hydra.run.dir={tmp_path / 'd3'}"], anonymous),
        }, timeout=120)
        ok = runs["fits"]
        assert ok.returncode == 0 and "the plan fits the cluster" in ok.stdout, ok.stdout + ok.stderr[-3000:]
        assert "3 alive node(s)" in ok.stdout and "rollout_node: 1" in ok.stdout
        too_big = runs["too_big"]
        assert too_big.returncode != 0 and "needs 2 rollout_node but the cluster has 1" in too_big.stdout + too_big.stderr, \
            too_big.stdout + too_big.stderr[-3000:]
        refused = runs["refused"]
        assert refused.returncode != 0 and "the plan fits" not in refused.stdout
        assert "InvalidAuthToken" in refused.stderr, refused.stderr[-3000:]  # refused, not unreachable
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(cluster_env["RAY_API_SERVER_ADDRESS"] + "/api/jobs/", timeout=10)
        assert denied.value.code in (401, 403)
        # Two jobs in a row. When every node shared one Ray temp dir, each node's runtime-env agent
        # unpacked the uploaded working_dir into the same directory while the driver imported
        # from it, and the first job died with a ModuleNotFoundError; now each node has its own.
        metrics_port = int(cluster_env["RLHF_METRICS_URL"].split(":")[-1].split("/")[0])  # the head's
        for i, steps in ((1, 2), (2, 1)):
            out = tmp_path / f"job{i}"
            overrides = [*(o for o in OVERRIDES if not o.startswith("trainer.total_steps=")), f"trainer.total_steps={steps}"]
            with GaugeWatcher(metrics_port) as gauges:
                job = subprocess.run(
                    ["bash", str(REPO / "deploy" / "submit.sh"), *overrides, f"trainer.output_dir={out}",
                     f"model.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / f'hydra{i}'}"],
                    env=cluster_env, cwd=REPO, capture_output=True, text=True, timeout=540)
            logs = job.stdout + job.stderr
            assert job.returncode == 0 and "run finished" in logs, f"job {i}:\n{logs[-6000:]}"
            # the job's driver joined this cluster (RAY_ADDRESS from the job supervisor)
            assert "resource plan" in logs and "Started a local Ray instance" not in logs
            # full PPO steps ran across the nodes and the engine took the new weights
            summary = json.loads((out / "summary.json").read_text())
            assert summary["steps"] == steps and summary["engine_versions"] == {"rollout-0": steps}, summary
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            assert [r["rollout/weight_version"] for r in rows] == [float(s + 1) for s in range(steps)]
            assert all(r["critic/loss"] is not None and r["policy/loss"] is not None for r in rows)
            # outputs, the trainer's console (progress bar) streamed through the job's logs, and
            # the driver's ray_rlhf_* gauges on the head's metrics endpoint while it ran
            assert (out / "final" / "config.json").exists() and any((out / "tensorboard").iterdir())
            assert "rl:" in logs
            if i == 1:  # (job 2's one step leaves its gauges only a moment before the driver exits)
                assert gauges.seen, "the driver's ray_rlhf_* gauges never reached the head's metrics endpoint"
        # every role of both jobs on its node type: engines on the rollout node, the rest on the
        # learner node, nothing on the head (which has a free CPU but neither node resource)
        listed = subprocess.run([sys.executable, "-c", PLACEMENT], env=cluster_env, cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr[-3000:]
        expected = {"rollout-0": "rollout", "policy-0": "learner", "critic-0": "learner", "reference-0": "learner",
                    "reward-0": "learner"}
        placed: dict[str, set[str]] = {}
        jobs: dict[str, set[str]] = {}
        for name, job_id, node_type in json.loads(listed.stdout):
            if name in expected:
                placed.setdefault(name, set()).add(node_type)
                jobs.setdefault(name, set()).add(job_id)
        assert {name: sorted(types) for name, types in placed.items()} == {n: [t] for n, t in expected.items()}, placed
        assert all(len(ids) == 2 for ids in jobs.values()), jobs  # seen for both jobs
        # one Ray temp dir per node: head, rollout node 0, learner node 0
        assert sorted(p.parent.name for p in Path(local_dir).glob("*/session_latest")) == ["h", "l0", "r0"]
    finally:
        stop = subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, text=True, timeout=120)
        left = kill_by_temp_dir(local_dir)
        shutil.rmtree(local_dir, ignore_errors=True)
    assert stop.returncode == 0, stop.stderr
    assert not left, f"processes of the local cluster survived stop: {left}"
