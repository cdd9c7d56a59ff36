"""Waiting for remote calls: one named timeout for every wait, errors that name the worker, and
``Pending`` (submitted calls plus how to combine their answers) so the driver can keep several
groups busy at once. Below ``groups`` and ``sync``: both use it, it uses neither."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray


class WorkerError(RuntimeError):
    """A remote call failed or timed out; the message names the worker."""


def wait(refs: list, workers: list, what: str, timeout_s: float) -> list:
    """``ray.get`` of one ref per worker, in order. Fails as soon as any worker fails (its
    peers may be blocked in a collective with it and would never answer), naming it; after
    ``timeout_s`` names the workers that have not answered."""
    if not refs:
        return []
    name_of = {r: w for r, w in zip(refs, workers, strict=True)}
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            stuck = ", ".join(repr(name_of[r]) for r in pending)
            raise WorkerError(f"{what}: no answer after {timeout_s:.0f}s from {stuck}")
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as e:
            culprit, error = _root_cause(ready[0], e, pending)
            raise WorkerError(f"{what} failed on {name_of[culprit]!r}: {error}") from error
    return ray.get(list(refs))


def _root_cause(ref, error: Exception, others: list, grace_s: float = 2.0) -> tuple[Any, Exception]:
    """The call to blame for ``error``: a peer blocked in a collective with a worker that died
    fails too, often first (gloo notices the closed connection before Ray reports the death), so
    a call that answers within ``grace_s`` with its worker dead is named instead."""
    if isinstance(error, ray.exceptions.RayActorError) or not others:
        return ref, error
    done, _ = ray.wait(others, num_returns=len(others), timeout=grace_s)
    for r in done:
        try:
            ray.get(r)
        except ray.exceptions.RayActorError as e:
            return r, e
        except ray.exceptions.RayError:
            pass
    return ref, error


@dataclass
class Pending:
    """Submitted calls of one group method: one ref per call, the worker that runs each, and how
    to combine the answers. ``result()`` waits with the group's named timeout; ``wait_all``
    waits for several groups' calls at once (they run concurrently meanwhile)."""

    refs: list
    names: list[str]
    what: str
    timeout_s: float
    combine: Callable[[list], Any] = lambda results: results
    submitted: float = 0.0  # time.perf_counter() at submission

    def __post_init__(self) -> None:
        self.submitted = self.submitted or time.perf_counter()

    def done(self) -> bool:
        return not ray.wait(self.refs, num_returns=len(self.refs), timeout=0)[1]

    def result(self) -> Any:
        return self.combine(wait(self.refs, self.names, self.what, self.timeout_s))


def wait_all(pending: list[Pending | None]) -> list:
    """The results of several ``Pending`` (``None`` stays ``None``), failing as soon as any call
    fails (naming its worker) or after the longest of their timeouts."""
    real = [p for p in pending if p is not None]
    refs = [r for p in real for r in p.refs]
    names = [f"{p.what} {n}" for p in real for n in p.names]
    wait(refs, names, "+".join(p.what for p in real), max((p.timeout_s for p in real), default=0.0))
    return [p.result() if p is not None else None for p in pending]


class Ready(Pending):
    """An answer already at hand, behaving like a finished ``Pending`` (for calls answered
    without a worker, and for in-process stand-ins of groups in controller tests)."""

    def __init__(self, value: Any, what: str = "ready"):
        super().__init__([], [], what, 0.0)
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value
