"""SIGKILL of the feedback service (the Ray actor on the cluster) loses no acknowledged label."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from rlhf_ray.feedback.service import FeedbackService
from rlhf_ray.feedback.store import LabelStore
from tests.feedback.test_service import call

pytestmark = pytest.mark.e2e


def test_sigkill_loses_no_acknowledged_label(ray_cluster, tmp_path):
    db = tmp_path / "labels.db"
    actor = ray.remote(FeedbackService).options(num_cpus=0, max_restarts=0).remote(str(db), token="k1ll")
    url = ray.get(actor.url.remote(), timeout=60)
    task_ids = ray.get(actor.add_tasks.remote([(f"rev {w}=", [w[::-1], w]) for w in ("ab", "cd", "ef", "gh")], 7))
    acknowledged = []
    for i, task_id in enumerate(task_ids):
        status, reply = call(url, "/api/rankings", {"task_id": task_id, "policy_version": 7, "labeler": f"l{i}",
                                                     "ranking": [0, 1]}, token="k1ll")
        assert status == 200
        acknowledged.append(reply["comparison_id"])
    os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(100):
            ray.get(actor.url.remote(), timeout=10)
            time.sleep(0.1)
    store = LabelStore(db)
    stored = store.comparisons()
    assert [c.id for c in stored] == acknowledged
    assert [c.labeler for c in stored] == ["l0", "l1", "l2", "l3"] and {c.policy_version for c in stored} == {7}
    store.close()
