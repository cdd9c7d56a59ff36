"""``ray job submit`` against a running cluster: a real head node on loopback (own ports, own
temp dir), a short GRPO job submitted through the Jobs API with ``deploy/runtime_env.yaml``, its
outputs and its logs checked, and only that head node stopped afterwards.

The job's driver must *join* the head (``RAY_ADDRESS`` is set by the job supervisor), not start
a cluster of its own: the test checks that the job's workers ran on the head node we started.
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
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.e2e.local_net import free_port, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


class HeadNode:
    """``ray start --head --block`` on 127.0.0.1 with free ports and a temp dir of its own.

    The ``ray start`` process leads its own process group (``start_new_session``); stopping
    signals that group, then any process left whose command line names our temp dir."""

    def __init__(self, num_cpus: int, env: dict[str, str]):
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: unix socket paths
        self.gcs_port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
        self.env = env
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}",
             f"--metrics-export-port={self.metrics_port}", f"--temp-dir={self.temp_dir}",
             f"--num-cpus={num_cpus}", f"--object-store-memory={256 * 2**20}", "--disable-usage-stats"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: "
                                   + (Path(self.temp_dir) / "ray_start.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"head node not ready after {timeout_s}s")

    def own_pids(self) -> list[int]:
        """Processes whose command line names this node's temp dir (raylet, workers, agents)."""
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != os.getpid():
                try:
                    if self.temp_dir.encode() in (p / "cmdline").read_bytes():
                        pids.append(int(p.name))
                except OSError:
                    pass
        return pids

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:  # on SIGTERM the node drains for up to 30 s; a test cluster needs no drain
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + timeout_s
        while self.own_pids() and time.monotonic() < deadline:
            time.sleep(1)
        for pid in self.own_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        if not self.own_pids():
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def head():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_metrics_report_interval_ms="1000")
    env.pop("RAY_ADDRESS", None)
    node = HeadNode(num_cpus=4, env=env)
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()
    assert not node.own_pids(), "processes of the test's head node survived stop()"


def job_runtime_env() -> dict:
    """``deploy/runtime_env.yaml`` with its working_dir resolved against the repository."""
    env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO / env["working_dir"])
    return env


def test_job_submit_joins_cluster_and_streams_logs(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "run"
    overrides = [
        "algo=grpo", "rollout.num_engines=1", "policy.num_ranks=1", "trainer.total_steps=2",
        "trainer.prompts_per_step=4", "algo.epochs=1", "rollout.max_new_tokens=6", "sync.check_samples=2",
        f"trainer.output_dir={out}", f"model.cache_dir={REPO / '.cache' / 'rlhf_ray'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    # The job runs in the head's worker environment, whose `python` need not be this venv's.
    entrypoint = " ".join([sys.executable, "-m", "rlhf_ray.train", *overrides])
    client = JobSubmissionClient(head.dashboard_url)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env())

    # The driver's gauges live on the endpoint only while the driver runs (Ray drops a dead
    # worker's series at its next report), so a thread scrapes often for the whole job.
    seen = threading.Event()
    done = threading.Event()

    def watch_metrics():
        while not done.is_set() and not seen.is_set():
            if "ray_rlhf_step{" in scrape(head.metrics_port):
                seen.set()
            done.wait(0.25)

    watcher = threading.Thread(target=watch_metrics, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 240
    try:
        while not (status := client.get_job_status(job_id)).is_terminal():
            assert time.monotonic() < deadline, f"job {job_id} still {status}:\n{client.get_job_logs(job_id)[-4000:]}"
            time.sleep(2)
    finally:
        done.set()
        watcher.join(timeout=10)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]

    # the job's driver joined our cluster (RAY_ADDRESS from the supervisor) and ran its workers there
    info = client.get_job_info(job_id)
    assert info.driver_node_id, info
    assert "resource plan" in logs and "run finished" in logs, logs[-4000:]
    assert "Started a local Ray instance" not in logs
    # the trainer's console (progress bar) and step metrics stream through `ray job logs`
    assert "rl:" in logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["rollout/weight_version"] for r in rows] == [1.0, 2.0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert (out / "final" / "config.json").exists()
    assert any((out / "tensorboard").iterdir())
    assert seen.is_set(), "the driver's ray_rlhf_* gauges never reached the head's metrics endpoint"
