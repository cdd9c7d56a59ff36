"""Fault injection for the recovery tests, off unless ``RLHF_RAY_FAULTS`` is set.

``RLHF_RAY_FAULTS="rollout-1@generate#2=exit,driver@checkpoint#2=kill"`` makes worker
``rollout-1`` exit abruptly in its 2nd ``generate`` call and the driver SIGKILL itself while
writing its 2nd checkpoint; ``storage@upload:s3://b/run/checkpoints/step_00000002/policy#1=kill``
kills the process uploading that directory after its first file (rlhf_ray/storage.py). Each
fault fires once per run: a marker file in
``RLHF_RAY_FAULTS_DIR`` remembers it across the restarts it causes. Counting is per process.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

_calls: Counter[str] = Counter()


def _faults() -> dict[str, str]:
    spec = os.environ.get("RLHF_RAY_FAULTS", "")
    return dict(item.split("=", 1) for item in spec.split(",") if "=" in item)


def maybe_fail(who: str, point: str) -> None:
    """Called at a few points of the code; does nothing unless a matching fault is configured."""
    faults = _faults()
    if not faults:
        return
    _calls[f"{who}@{point}"] += 1
    key = f"{who}@{point}#{_calls[f'{who}@{point}']}"
    action = faults.get(key)
    if action is None:
        return
    marker = Path(os.environ.get("RLHF_RAY_FAULTS_DIR", ".")) / f"fired-{key.replace('/', '_')}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "exit":
        os._exit(1)
    if action == "hang":
        import time

        time.sleep(10**6)


def fault_env() -> dict[str, str]:
    """The fault settings to hand to workers (empty when none are set)."""
    return {k: os.environ[k] for k in ("RLHF_RAY_FAULTS", "RLHF_RAY_FAULTS_DIR") if k in os.environ}
