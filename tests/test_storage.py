"""Cluster storage without Ray: uploads, downloads and the checkpoint bookkeeping on an S3
server on loopback, and a process killed mid-upload leaves a checkpoint that is never taken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray import checkpoint as ckpt
from rlhf_ray import storage
from rlhf_ray.config import Config, TrainerConfig, config_errors

ROOT = "s3://rlhf-test/run/checkpoints"


@pytest.fixture(scope="module")
def s3(s3_env):
    """The session's S3 server (tests/conftest.py); each test here writes its own prefix."""
    return s3_env


def save(root: str, step: int, complete: bool = True) -> str:
    """What a checkpoint save does: every rank uploads its files, then the driver's state and marker."""
    path = ckpt.step_dir(root, step)
    with storage.local_dir(storage.join(path, "policy")) as local:
        Path(local, "ds").mkdir()
        Path(local, "ds", "shard.pt").write_bytes(b"x" * 1000)
        Path(local, "rng_rank0.json").write_text("{}")
    ckpt.write_driver_state(path, {"step": step, "config_hash": "h"})
    if complete:
        ckpt.mark_complete(path, step)
    return path


def test_upload_and_fetch_round_trip(s3):
    target = "s3://rlhf-test/round/trip"
    with storage.local_dir(target) as local:
        Path(local, "a.txt").write_text("A")
        Path(local, "sub").mkdir()
        Path(local, "sub", "b.bin").write_bytes(b"\x00\x01")
    assert storage.exists(f"{target}/sub/b.bin") and not storage.exists(f"{target}/c")
    with storage.fetched(target) as local:
        assert sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file()) == ["a.txt", "sub/b.bin"]
        assert Path(local, "sub", "b.bin").read_bytes() == b"\x00\x01"
    # nothing is uploaded when the block fails
    with pytest.raises(RuntimeError), storage.local_dir("s3://rlhf-test/failed") as local:
        Path(local, "a.txt").write_text("A")
        raise RuntimeError("writer died")
    assert storage.subdirs("s3://rlhf-test", "failed") == []


def test_checkpoint_bookkeeping_on_s3(s3):
    root = "s3://rlhf-test/book/checkpoints"
    for step in (1, 2):
        save(root, step)
    save(root, 3, complete=False)
    assert ckpt.latest(root) == ckpt.step_dir(root, 2)
    save(root, 4)
    assert sorted(ckpt.prune(root, keep=2)) == [ckpt.step_dir(root, 1), ckpt.step_dir(root, 3)]
    assert ckpt.checkpoints(root) == [ckpt.step_dir(root, 2), ckpt.step_dir(root, 4)]
    assert ckpt.read_driver_state(ckpt.latest(root))["step"] == 4
    assert ckpt.latest("s3://rlhf-test/nothing/here") is None


SAVE_SCRIPT = """
import sys
from tests.test_storage import save
save(sys.argv[1], int(sys.argv[2]))
"""


def test_kill_during_upload_leaves_no_complete_checkpoint(s3, tmp_path):
    root = "s3://rlhf-test/killed/checkpoints"
    save(root, 1)
    step2 = ckpt.step_dir(root, 2)
    # killed after the first of the two files of step 2's policy upload
    env = dict(os.environ, RLHF_RAY_FAULTS=f"storage@upload:{step2}/policy#1=kill", RLHF_RAY_FAULTS_DIR=str(tmp_path),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, root, "2"], env=env, timeout=120,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert storage.subdirs(root, "step_") == ["step_00000001", "step_00000002"]  # partly uploaded
    assert storage.exists(f"{step2}/policy/ds/shard.pt") and not storage.exists(f"{step2}/policy/rng_rank0.json")
    assert not ckpt.is_complete(step2)
    assert ckpt.latest(root) == ckpt.step_dir(root, 1)  # resume would take step 1, never step 2
    save(root, 3)
    ckpt.prune(root, keep=2)
    assert storage.subdirs(root, "step_") == ["step_00000001", "step_00000003"]  # the partial one is gone


def test_uri_config_checks():
    cfg = Config(trainer=TrainerConfig(output_dir="nosuchfs://bucket/run", checkpoint_dir="s3://bucket/ckpt"))
    errors = [e for e in config_errors(cfg) if e.startswith("trainer.")]
    assert len(errors) == 1 and errors[0].startswith("trainer.output_dir: cannot open nosuchfs:// locations")
    assert storage.join("s3://b/run/", "final") == "s3://b/run/final" and not storage.is_uri("/tmp/x")
