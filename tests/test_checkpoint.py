"""Checkpoint bookkeeping: the marker decides, pruning waits for a newer complete one."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_ray import checkpoint as ckpt


def make(root, step, complete=True):
    p = ckpt.step_dir(root, step)
    ckpt.write_driver_state(p, {"step": step, "config_hash": "h"})
    if complete:
        ckpt.mark_complete(p, step)
    return Path(p)


def test_latest_ignores_incomplete(tmp_path):
    make(tmp_path, 1)
    make(tmp_path, 2)
    make(tmp_path, 3, complete=False)
    assert Path(ckpt.latest(tmp_path)).name == "step_00000002"
    assert ckpt.latest(tmp_path / "missing") is None


def test_prune_keeps_newest_and_drops_stale_partials(tmp_path):
    for s in (1, 2):
        make(tmp_path, s)
    partial_old = make(tmp_path, 3, complete=False)  # a crash left it
    make(tmp_path, 4)
    partial_new = make(tmp_path, 5, complete=False)  # being written right now: keep
    deleted = ckpt.prune(tmp_path, keep=2)
    assert sorted(Path(p).name for p in deleted) == ["step_00000001", "step_00000003"]
    assert not partial_old.exists() and partial_new.exists()
    assert [Path(p).name for p in ckpt.checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]


def test_config_mismatch_is_refused_unless_asked(tmp_path):
    with pytest.raises(ckpt.CheckpointMismatchError, match="resume_ignore_config"):
        ckpt.check_config({"config_hash": "a"}, "b", ignore=False, where=tmp_path)
    ckpt.check_config({"config_hash": "a"}, "b", ignore=True, where=tmp_path)
