"""The two small pieces that make bounded staleness a guarantee (pure Python + torch, no Ray):

- ``RolloutBuffer``: the FIFO of rollout batches submitted ahead of the learner, bounded to
  ``max_staleness + 1`` batches. The bound is what throttles the engines: a batch is only
  submitted when there is room, and it asks for weights recent enough (``min_version``).
- ``VersionLedger``: which weight version a new batch must be generated with, and the
  staleness of every trained token (learner version at the update minus the version of the
  weights that generated the token), checked against the bound.

Versions count updates: the learner holds version ``v`` after ``v`` updates, and an update
applied to weights ``v`` produces ``v + 1``. A batch submitted while the learner is at ``v``
with ``ahead`` batches before it in the buffer is trained at a version of at most ``v + ahead``
(steps skipped for non-finite rewards do not update), so asking for weights ``>= v + ahead - k``
keeps every token within ``k`` versions of the weights it is trained on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class StalenessViolation(RuntimeError):
    """A token would be trained on weights more than ``max_staleness`` versions newer."""


class RolloutBuffer(Generic[T]):
    """FIFO of in-flight rollout batches with room for ``max_staleness + 1``."""

    def __init__(self, max_staleness: int):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.capacity = max_staleness + 1
        self._items: deque[T] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def has_room(self) -> bool:
        return len(self._items) < self.capacity

    def put(self, item: T) -> int:
        """Append; returns how many batches are ahead of it. Raises when full (the caller
        must throttle, not overfill)."""
        if not self.has_room():
            raise OverflowError(f"rollout buffer full ({self.capacity} batches)")
        self._items.append(item)
        return len(self._items) - 1

    def peek(self) -> T:
        return self._items[0]

    def pop(self) -> T:
        return self._items.popleft()

    def fill(self) -> float:
        """Fraction of the bound in use."""
        return len(self._items) / self.capacity


@dataclass(frozen=True)
class Staleness:
    mean: float  # mean over trained tokens of (learner version - token version)
    max: int
    tokens: int
    violations: int  # tokens older than the bound (0 unless throttling failed)


class VersionLedger:
    def __init__(self, max_staleness: int):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness

    def min_version(self, learner_version: int, ahead: int) -> int:
        """Oldest weights allowed to generate a batch with ``ahead`` batches before it in the
        buffer while the learner is at ``learner_version`` (``ahead <= max_staleness``, so the
        learner's current weights always qualify and engines never wait for the impossible)."""
        if ahead > self.max_staleness:
            raise ValueError(f"{ahead} batches ahead exceeds max_staleness={self.max_staleness}")
        return max(learner_version + ahead - self.max_staleness, 0)

    def staleness(self, token_versions: torch.Tensor, mask: torch.Tensor, learner_version: int) -> Staleness:
        """``token_versions`` and ``mask`` ``(B, A)``: per-token staleness at an update of
        weights ``learner_version``."""
        lag = (learner_version - token_versions)[mask.bool()]
        if lag.numel() == 0:
            return Staleness(0.0, 0, 0, 0)
        if bool((lag < 0).any()):
            raise StalenessViolation(f"a token claims version {int(token_versions[mask.bool()].max())}, newer than "
                                     f"the learner's v{learner_version}")
        return Staleness(float(lag.float().mean()), int(lag.max()), int(lag.numel()),
                         int((lag > self.max_staleness).sum()))

    def rows_beyond(self, token_versions: torch.Tensor, mask: torch.Tensor, learner_version: int) -> torch.Tensor:
        """(B,) bool: rows holding a token older than the bound (dropped and counted by the
        trainer; throttling makes this empty unless something went wrong)."""
        return (((learner_version - token_versions) > self.max_staleness) & mask.bool()).any(-1)
