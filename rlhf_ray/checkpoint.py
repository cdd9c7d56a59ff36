"""Checkpoints of a run: ``<root>/step_<n>/`` holds the DeepSpeed checkpoints of the policy and
critic groups (weights, optimizer, LR schedule, per-rank RNG) and ``driver.json`` (step,
weight version, prompt position, KL controller, reward statistics, config hash). A checkpoint
counts only once its ``COMPLETE`` marker exists; the marker is written last, atomically, and
older checkpoints are pruned only after a newer one is complete.

``root`` is a local directory or a URI (``s3://...``; see :mod:`rlhf_ray.storage`): paths are
plain strings, and every read and write goes through the storage module.
"""

from __future__ import annotations

import json

from rlhf_ray import storage

MARKER = "COMPLETE"
DRIVER_STATE = "driver.json"


class CheckpointMismatchError(RuntimeError):
    """The checkpoint was written by a run with a different config."""


def step_dir(root: str, step: int) -> str:
    return storage.join(root, f"step_{step:08d}")


def is_complete(path: str) -> bool:
    return storage.exists(storage.join(path, MARKER))


def checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root``, oldest first."""
    return [p for p in (storage.join(root, n) for n in storage.subdirs(root, "step_")) if is_complete(p)]


def latest(root: str) -> str | None:
    found = checkpoints(root)
    return found[-1] if found else None


def write_driver_state(path: str, state: dict) -> None:
    storage.write_text(storage.join(path, DRIVER_STATE), json.dumps(state, indent=2, sort_keys=True))


def read_driver_state(path: str) -> dict:
    return json.loads(storage.read_text(storage.join(path, DRIVER_STATE)))


def mark_complete(path: str, step: int) -> None:
    storage.write_text(storage.join(path, MARKER), f"{step}\n")


def prune(root: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, and any incomplete one older
    than the newest complete checkpoint (left by a crash). Returns what was deleted."""
    complete = checkpoints(root)
    if not complete:
        return []
    newest = complete[-1].rsplit("/", 1)[-1]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [storage.join(root, n) for n in storage.subdirs(root, "step_")
               if n < newest and storage.join(root, n) not in complete]
    for p in doomed:
        storage.remove_tree(p)
    return doomed


def check_config(state: dict, config_hash: str, ignore: bool, where: str) -> None:
    if state.get("config_hash") != config_hash and not ignore:
        raise CheckpointMismatchError(
            f"{where} was written with config hash {state.get('config_hash')}, this run has {config_hash}; "
            "resume with the same config, or set trainer.resume_ignore_config=true to load it anyway"
        )
