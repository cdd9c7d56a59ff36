"""Start-up that never gets stuck: a run killed during start-up leaves nothing a later run can
hang on. In particular a torch-extensions ``lock`` left by a build killed mid-compile (exactly
the file torch's ``FileBaton`` leaves) must not stop the next run in ``deepspeed.init_distributed``
(the learner ranks skip DeepSpeed's JIT-built shared-memory comm op, see
``rlhf_ray.workers.deepspeed_rank.skip_shm_comm_op``). Before that fix the next run waited
forever. Also: every role's init time lands in the summary.

The runs after the stale lock are a Hydra ``-m`` sweep of real training runs in one process
(``policy.num_ranks=1,2``): each job starts its own local Ray cluster (the previous one was shut
down), writes its own run directory and metrics, and the scaling knob of each job is the one it
ran with."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
RUN = ["algo=grpo", "trainer.total_steps=1", "trainer.prompts_per_step=4", "rollout.max_new_tokens=6",
       "policy.micro_batch_size=4", "cluster.call_timeout_s=300"]


def shm_build_dir(extensions: Path) -> Path:
    """Where torch builds (and locks) DeepSpeed's ``deepspeed_shm_comm`` under ``extensions``."""
    code = ("from torch.utils.cpp_extension import _get_build_directory as d; "
            "print(d('deepspeed_shm_comm', verbose=False))")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions))
    return Path(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               check=True).stdout.strip())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """A run killed during start-up, the stale lock, then the sweep (two runs) after them."""
    tmp_path = tmp_path_factory.mktemp("startup")
    extensions = tmp_path / "torch_extensions"  # the runs' private extensions cache
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO), TORCH_EXTENSIONS_DIR=str(extensions))
    base = [sys.executable, "-m", "rlhf_ray.train", *RUN, f"model.cache_dir={cache_dir}"]

    # 1. a run killed (SIGKILL to the driver, Ray and every worker) while starting up
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        killed = subprocess.Popen([*base, f"trainer.output_dir={tmp_path / 'killed'}"], cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while "resource plan" not in log.read_text() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # workers are being spawned
        # the driver, its Ray processes and their workers (which run in sessions of their own)
        tree = [killed.pid] + [p.pid for p in psutil.Process(killed.pid).children(recursive=True)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.wait()
    # 2. the lock a build killed mid-compile leaves (torch's FileBaton: an empty file named `lock`)
    lock = shm_build_dir(extensions) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    # 3. the next runs start and train normally: a sweep over the learner's ranks
    sweep = tmp_path / "sweep"
    done = subprocess.run([*base[:3], "-m", *base[3:], "rollout.num_engines=1", "algo.epochs=1", "policy.num_ranks=1,2",
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=700)
    return {"killed_log": log.read_text(), "extensions": extensions, "sweep": sweep, "done": done}


def test_killed_start_up_then_stale_extension_lock_then_normal_run(runs):
    assert "resource plan" in runs["killed_log"], runs["killed_log"][-3000:]
    done = runs["done"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    for job in (0, 1):
        summary = json.loads((runs["sweep"] / str(job) / "summary.json").read_text())
        assert summary["steps"] == 1
        startup = summary["startup"]
        for role in ("rollout", "reward", "reference", "policy"):
            assert startup[f"{role}_init_s"] > 0, startup
        assert startup["to_first_step_s"] >= max(startup[f"{r}_init_s"] for r in ("rollout", "policy"))
    assert not list(runs["extensions"].rglob("*.so")), "nothing was JIT-built on the start-up path"


def test_multirun_scaling_sweep(runs):
    done, sweep = runs["done"], runs["sweep"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert done.stderr.count("Started a local Ray instance") == 2, "each job starts (and stops) its own cluster"
    for job, ranks in ((0, 1), (1, 2)):
        run = sweep / str(job)
        assert f"policy.num_ranks={ranks}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert json.loads((run / "config.json").read_text())["policy"]["num_ranks"] == ranks
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1] and rows[0]["rollout/weight_version"] == 1.0
        assert json.loads((run / "summary.json").read_text())["steps"] == 1
