"""Checkpoints of a run: ``<root>/step_<n>/`` holds the DeepSpeed checkpoints of the policy and
critic groups (weights, optimizer, LR schedule, per-rank RNG) and ``driver.json`` (step,
weight version, prompt position, KL controller, reward statistics, config hash). A checkpoint
counts only once its ``COMPLETE`` marker exists; the marker is written last, atomically, and
older checkpoints are pruned only after a newer one is complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "COMPLETE"
DRIVER_STATE = "driver.json"


class CheckpointMismatchError(RuntimeError):
    """The checkpoint was written by a run with a different config."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_driver_state(path: Path, state: dict) -> None:
    _write_atomic(Path(path) / DRIVER_STATE, json.dumps(state, indent=2, sort_keys=True))


def read_driver_state(path: Path) -> dict:
    return json.loads((Path(path) / DRIVER_STATE).read_text(encoding="utf-8"))


def mark_complete(path: Path, step: int) -> None:
    _write_atomic(Path(path) / MARKER, f"{step}\n")


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and any incomplete one older
    than the newest complete checkpoint (left by a crash). Returns what was deleted."""
    complete = checkpoints(root)
    if not complete:
        return []
    newest = complete[-1]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [p for p in Path(root).glob("step_*") if p.is_dir() and not is_complete(p) and p.name < newest.name]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def check_config(state: dict, config_hash: str, ignore: bool, where: Path) -> None:
    if state.get("config_hash") != config_hash and not ignore:
        raise CheckpointMismatchError(
            f"{where} was written with config hash {state.get('config_hash')}, this run has {config_hash}; "
            "resume with the same config, or set trainer.resume_ignore_config=true to load it anyway"
        )
