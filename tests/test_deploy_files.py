"""The deployment files agree with the code: every YAML parses; the cluster launcher configs
validate against Ray's schema; node types advertise exactly the node resources placement.py asks
for, and the run each cluster is sized for (and the RayJob's entrypoint) fits it node by node;
the entrypoint is ``python -m rlhf_ray.train`` with overrides that compose into a valid config;
runtime_env keys are Ray's and carry no secrets; images are pinned; token auth and loopback
binding are on; the Grafana dashboard charts only series metrics.py exports."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from rlhf_ray.metrics import RAY_GAUGE_KEYS
from rlhf_ray.placement import ROLE_NODE_RESOURCE, check_fits, resource_plan
from tests.conftest import compose

REPO = Path(__file__).resolve().parents[1]
NODE_RESOURCES = set(ROLE_NODE_RESOURCE.values())
LAUNCHER = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
KUBERAY = REPO / "deploy" / "kuberay"
SECRETISH = re.compile(r"(^|_)(token|secret|password|api_key)($|_)|^RAY_AUTH", re.I)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pinned(image: str) -> bool:
    """A registry image with an explicit tag other than latest, or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def overrides_fit(overrides: list[str], nodes: list[dict[str, float]]) -> list[str]:
    """check_fits of the plan these train.py overrides make, on these nodes."""
    cfg = compose([o for o in overrides if not o.startswith("hydra.")])
    total: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            total[k] = total.get(k, 0) + v
    return check_fits(resource_plan(cfg), total, nodes)


def test_every_yaml_parses():
    files = sorted([*REPO.glob("cluster/**/*.yaml"), *REPO.glob("deploy/**/*.yaml")])
    assert len(files) >= 5
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


def test_runtime_env_is_valid_and_secret_free():
    from ray.runtime_env import RuntimeEnv

    env = load(REPO / "deploy" / "runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own validation
    assert env["working_dir"] == "."
    for heavy in (".venv/", ".cache/", "outputs/", ".git/", "multirun/"):
        assert heavy in env["excludes"]
    assert not [k for k in env.get("env_vars", {}) if SECRETISH.search(k)]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config(path):
    import jsonschema
    import ray.autoscaler

    cfg = load(path)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not set(head["resources"]) & NODE_RESOURCES, "RL workers must not land on the head"
    assert {r for t in types.values() for r in t["resources"] if r not in ("CPU", "GPU")} == NODE_RESOURCES
    assert pinned(cfg["docker"]["image"]), cfg["docker"]["image"]
    # the example run fits the cluster at min_workers, node by node
    nodes = [t["resources"] for t in types.values() for _ in range(t.get("min_workers", 0))]
    assert not overrides_fit(cfg["metadata"]["rlhf_ray_example"].split(), nodes)
    # token auth on every node; the dashboard on the head's loopback only
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert "0.0.0.0" not in path.read_text()


def kuberay_nodes(cluster_spec: dict) -> list[dict[str, float]]:
    """Each pod's Ray resources, as KubeRay starts them (limits -> CPU/GPU, rayStartParams)."""

    def pod(group: dict) -> dict[str, float]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        res = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        custom = group["rayStartParams"].get("resources")
        if custom:
            res.update(json.loads(custom.strip('"').replace('\\"', '"')))
        return res

    nodes = [pod(cluster_spec["headGroupSpec"])]
    for g in cluster_spec["workerGroupSpecs"]:
        nodes += [pod(g)] * g["minReplicas"]
    return nodes


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_raycluster():
    rc = load(KUBERAY / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["rayVersion"] == ray_pin()
    head = kuberay_nodes(spec)[0]
    assert not set(head) & NODE_RESOURCES
    assert {k for n in kuberay_nodes(spec) for k in n if k not in ("CPU", "GPU")} == NODE_RESOURCES
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    for c in containers(spec):
        assert pinned(c["image"])
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # never a literal token
    # the example command in the header fits the cluster
    example = re.search(r"deploy/submit\.sh (.+?)\\\n#\s+(.+)\n", (KUBERAY / "raycluster.yaml").read_text())
    assert example and not overrides_fit((example[1] + " " + example[2]).split(), kuberay_nodes(spec))


def test_kuberay_rayjob_runs_the_trainer():
    job = load(KUBERAY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "rlhf_ray.train"]
    assert importlib.util.find_spec(words[2]) is not None
    overrides = words[3:]
    assert not overrides_fit(overrides, kuberay_nodes(job["spec"]["rayClusterSpec"]))
    assert any(o.startswith("trainer.output_dir=/shared/") for o in overrides)
    assert "cluster.node_resources=true" in overrides
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == ray_pin()
    assert all(pinned(c["image"]) for c in containers(spec))
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields
    assert not [k for k in env.get("env_vars", {}) if SECRETISH.search(k)]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("ray["))


def test_dockerfile_pins_the_stack():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text)[1]
    assert pinned(base) and f":{ray_pin()}-" in base, base
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", text)
    assert 'pip install ".[gpu]"' in text
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.fullmatch(r"vllm==[\d.]+", d) for d in extras["gpu"])
    # the image every manifest runs is a build of this Dockerfile: same tag everywhere
    images = {c["image"] for f in ("raycluster.yaml", "rayjob.yaml")
              for c in containers(load(KUBERAY / f)["spec"].get("rayClusterSpec") or load(KUBERAY / f)["spec"])}
    assert len(images) == 1


def test_scripts():
    scripts = [REPO / "deploy" / "submit.sh", REPO / "cluster" / "local_multinode.sh",
               REPO / "cluster" / "stop_local_multinode.sh"]
    for s in scripts:
        assert os.access(s, os.X_OK), f"{s} is not executable"
        subprocess.run(["bash", "-n", str(s)], check=True)
    submit = scripts[0].read_text()
    assert "job submit" in submit and "--runtime-env deploy/runtime_env.yaml" in submit
    assert "--working-dir ." in submit and "-m rlhf_ray.train" in submit
    assert "RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}" in submit
    local = scripts[1].read_text()
    assert "--node-ip-address=127.0.0.1" in local and "--dashboard-host=127.0.0.1" in local
    assert "RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}" in local
    assert "pkill" not in local and "killall" not in local and "ray stop" not in local


def test_submit_refuses_token_mode_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    out = subprocess.run([str(REPO / "deploy" / "submit.sh"), "trainer.total_steps=1"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "no token" in out.stderr


def test_grafana_dashboard_charts_exported_series():
    dash = json.loads((REPO / "deploy" / "grafana" / "rlhf_ray_dashboard.json").read_text())
    exported = {"ray_rlhf_" + k.replace("/", "_") for k in RAY_GAUGE_KEYS}
    exported |= {"ray_rlhf_phase_seconds", "ray_rlhf_engine_weight_version", "ray_rlhf_samples_in_flight"}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_rlhf_[a-z_]+", e)}
    assert used <= exported, used - exported
    for needed in ("ray_rlhf_reward_mean", "ray_rlhf_kl_mean", "ray_rlhf_phase_seconds",
                   "ray_rlhf_rollout_tokens_per_s", "ray_rlhf_engine_weight_version"):
        assert needed in used
    assert all(p["datasource"]["type"] == "prometheus" for p in dash["panels"])
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource"}
