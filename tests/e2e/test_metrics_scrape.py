"""The driver's RL gauges reach Ray's Prometheus endpoint: a child process starts a Ray node
with ``_metrics_export_port``, logs one step through ``MetricsLogger`` exactly as the trainer
does, and this test scrapes ``http://127.0.0.1:<port>/metrics`` until the ``ray_rlhf_*`` series
appear, then checks their values and tags and that every series the shipped Grafana dashboard
queries exists.

The child owns the Ray node (the test session may already be connected to another one).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.local_net import free_port, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "rlhf_ray_dashboard.json"
STEP = {
    "reward/mean": 0.25, "reward/gold": 0.5, "kl/mean": 0.015, "policy/loss": -0.1, "critic/loss": 0.3,
    "rollout/weight_version": 3.0, "rollout/tokens_per_s": 1234.5, "rollout/samples": 64.0,
    "rollout/tokens": 640.0, "sync/seconds": 0.05, "timing/step": 9.5, "timing/rollout": 4.0,
    "timing/reward": 0.5, "timing/experience": 1.0, "timing/advantages": 0.01, "timing/update": 3.0,
    "timing/sync": 0.9, "rollout/weight_version/rollout-0": 3.0, "rollout/weight_version/rollout-1": 3.0,
    "rollout/busy_fraction": 0.8, "learner/busy_fraction": 0.7, "rollout/buffer_fill": 1.0,
"rollout/staleness_mean": 0.5, "rollout/staleness_max": 1.0,
    "rollout/dropped_samples": 0.0,
}

CHILD = """
import json, sys, tempfile, ray
port = int(sys.argv[1])
ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=128 * 2**20, _metrics_export_port=port,
         _system_config={"metrics_report_interval_ms": 1000})
from rlhf_ray.metrics import MetricsLogger, set_samples_in_flight
logger = MetricsLogger(tempfile.mkdtemp(), total_steps=5, tensorboard=False)
logger.log(3, json.loads(sys.argv[2]))
set_samples_in_flight(48)
print("logged", flush=True)
sys.stdin.read()  # keep the driver (the gauges' emitter) alive until the test has scraped
logger.close()
ray.shutdown()
"""


def rlhf_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("ray_rlhf_")]


def test_rl_gauges_on_prometheus_endpoint():
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port), json.dumps(STEP)], cwd=REPO, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while "logged" not in line and time.monotonic() < deadline and child.poll() is None:
            line = child.stdout.readline()
        assert "logged" in line, f"child did not log (exit {child.poll()}): {line}"
        wanted = {"ray_rlhf_step", "ray_rlhf_reward_mean", "ray_rlhf_phase_seconds",
                  "ray_rlhf_engine_weight_version", "ray_rlhf_samples_in_flight"}
        deadline, samples = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            samples = rlhf_samples(scrape(port))
            if wanted <= {name for name, _, _ in samples}:
                break
            time.sleep(1)
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    names = {name for name, _, _ in samples}
    assert wanted <= names, f"missing {wanted - names}; got {sorted(names)}"

    def value(name: str, **tags: str) -> float:
        hits = [v for n, labels, v in samples if n == name and all(labels.get(k) == t for k, t in tags.items())]
        assert len(hits) == 1, (name, tags, hits)
        return hits[0]

    assert value("ray_rlhf_step", role="driver") == 3
    assert value("ray_rlhf_reward_mean", role="driver") == pytest.approx(0.25)
    assert value("ray_rlhf_kl_mean") == pytest.approx(0.015)
    assert value("ray_rlhf_rollout_tokens_per_s") == pytest.approx(1234.5)
    assert value("ray_rlhf_phase_seconds", phase="rollout") == pytest.approx(4.0)
    assert value("ray_rlhf_phase_seconds", phase="update") == pytest.approx(3.0)
    assert value("ray_rlhf_engine_weight_version", engine="rollout-1") == 3
    assert value("ray_rlhf_samples_in_flight") == 48
    assert value("ray_rlhf_rollout_busy_fraction") == pytest.approx(0.8)
    assert value("ray_rlhf_rollout_staleness_max") == 1

    # every series the Grafana dashboard charts is exported
    queried = set(re.findall(r"ray_rlhf_[a-z_]+", DASHBOARD.read_text()))
    assert queried and queried <= names, f"dashboard queries series nobody exports: {queried - names}"
