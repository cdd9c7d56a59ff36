"""``groups.start_all`` (control flow only, so plain objects stand in for worker groups): every
group starts at once, each role's seconds come back, and the first failure is raised while
other groups are still starting."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from rlhf_ray.groups import WorkerError, start_all


class FakeGroup:
    def __init__(self, role: str, seconds: float = 0.0, error: Exception | None = None,
                 release: threading.Event | None = None):
        self.plan = SimpleNamespace(role=role)
        self.seconds, self.error, self.release = seconds, error, release
        self.started_at = None

    def start(self) -> float:
        self.started_at = time.monotonic()
        if self.release is not None:
            self.release.wait(10)
        time.sleep(self.seconds)
        if self.error is not None:
            raise self.error
        return self.seconds


def test_groups_start_concurrently_and_report_each_role():
    groups = [FakeGroup("rollout", 0.3), FakeGroup("policy", 0.3), FakeGroup("reference", 0.3)]
    start = time.monotonic()
    seconds = start_all(groups)
    assert time.monotonic() - start < 0.6  # 3 x 0.3 s one after the other would take 0.9 s
    assert seconds == {"rollout": 0.3, "policy": 0.3, "reference": 0.3}
    assert max(g.started_at for g in groups) - min(g.started_at for g in groups) < 0.1


def test_first_failure_raised_while_others_still_start():
    stuck = threading.Event()  # this group never finishes until the test releases it
    groups = [FakeGroup("rollout", release=stuck), FakeGroup("policy", 0.05, WorkerError("policy-1 died"))]
    start = time.monotonic()
    with pytest.raises(WorkerError, match="policy-1"):
        start_all(groups)
    assert time.monotonic() - start < 2
    stuck.set()
