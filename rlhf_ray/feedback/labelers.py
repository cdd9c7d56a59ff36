"""Labelers: who ranks the tasks the feedback service hands out.

- people: the labeling page (``GET /`` of the service) or any client of its JSON API; nothing
  runs here for them;
- ``ai``: the built-in task's gold labeler (``rlhf_ray.data.task.gold_score``) standing in for
  people, with configurable noise (a random ranking with probability ``noise``) and latency;
- ``http``: an external labeling service or LLM judge: ``POST {"prompt", "completions"}`` ->
  ``{"ranking": [indices best -> worst], "ties": [positions p tied with p + 1, optional]}``, with
  a timeout, retries and a bearer token.

Machine labelers run in :class:`LabelerThread`, a client of the service's HTTP API exactly as
a person's browser is: it takes a task, ranks it, posts the ranking. It runs beside training,
so a slow or unreachable labeler never stalls a step; its failures and timeouts are counted
(``feedback/labeler_timeouts``, ``feedback/labeler_errors`` in the step metrics).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from rlhf_ray.config import FeedbackConfig

log = logging.getLogger(__name__)

# (prompt, completions) -> (indices best -> worst, positions p in that ranking tied with p + 1)
Ranker = Callable[[str, list[str]], tuple[list[int], list[int]]]


class LabelerTimeout(RuntimeError):
    """The labeler did not answer in time."""


class AILabeler:
    """Ranks by the gold score, equal scores reported as ties (in random order); with probability
    ``noise`` a random ranking without ties. Forcing an order on equal completions would hand the
    reward model coin flips as preferences (a fifth of the pairs of a sharpened policy's samples)."""

    def __init__(self, noise: float = 0.0, latency_s: float = 0.0, seed: int = 0, gold: Callable | None = None):
        from rlhf_ray.data.task import gold_score

        self.noise, self.latency_s, self.rng = noise, latency_s, random.Random(seed)
        self.gold = gold or gold_score

    def __call__(self, prompt: str, completions: list[str]) -> tuple[list[int], list[int]]:
        if self.latency_s:
            time.sleep(self.latency_s)
        order = list(range(len(completions)))
        self.rng.shuffle(order)  # random order within ties (sorted() below is stable)
        if self.rng.random() < self.noise:
            return order, []
        scores = [self.gold(prompt, c) for c in completions]
        ranking = sorted(order, key=lambda i: -scores[i])
        return ranking, [p for p in range(len(ranking) - 1) if scores[ranking[p]] == scores[ranking[p + 1]]]


class HttpLabeler:
    """An external labeling service: POST {prompt, completions} -> {ranking}."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 10.0, retries: int = 2):
        self.url, self.token, self.timeout_s, self.retries = url, token, timeout_s, retries

    def __repr__(self) -> str:
        return f"HttpLabeler({self.url})"  # never the token

    def __call__(self, prompt: str, completions: list[str]) -> tuple[list[int], list[int]]:
        body = json.dumps({"prompt": prompt, "completions": completions}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: Exception | None = None
        for attempt in range(self.retries):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    reply = json.loads(r.read())
                return [int(i) for i in reply["ranking"]], [int(p) for p in reply.get("ties", [])]
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500 and e.code != 429:
                    break  # a client error does not heal by retrying
            except (TimeoutError, urllib.error.URLError, OSError) as e:
                last = e
            except (KeyError, TypeError, ValueError) as e:
                raise RuntimeError(f"labeler {self.url}: bad reply: {e}") from e
            time.sleep(min(0.2 * 2**attempt, 2.0))
        reason = getattr(last, "reason", last)
        if isinstance(last, TimeoutError) or isinstance(reason, TimeoutError):
            raise LabelerTimeout(f"labeler {self.url}: no answer within {self.timeout_s}s ({self.retries} attempts)")
        raise RuntimeError(f"labeler {self.url} failed after {self.retries} attempts: {last}")


def build_labeler(cfg: FeedbackConfig, seed: int = 0) -> Ranker | None:
    """The configured machine labeler, or None for ``people``."""
    if cfg.labeler == "ai":
        return AILabeler(cfg.ai_noise, cfg.ai_latency_s, seed)
    if cfg.labeler == "http":
        token = os.environ.get(cfg.labeler_token_env, "") if cfg.labeler_token_env else ""
        if cfg.labeler_token_env and not token:
            raise ValueError(f"feedback.labeler_token_env: environment variable {cfg.labeler_token_env} is not set")
        return HttpLabeler(cfg.labeler_url, token, cfg.labeler_timeout_s, cfg.labeler_retries)
    return None


class LabelerThread:
    """Takes tasks from the service's HTTP API, ranks them with ``ranker``, posts the rankings."""

    def __init__(self, service_url: str, ranker: Ranker, name: str, token: str = "", poll_s: float = 0.2):
        self.url, self.ranker, self.name, self.token, self.poll_s = service_url, ranker, name, token, poll_s
        self.counts = {"labeled": 0, "timeouts": 0, "errors": 0}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"labeler-{name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)

    def _request(self, path: str, body: dict | None = None) -> tuple[int, dict | None]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, task = self._request(f"/api/task?labeler={self.name}")
                if status != 200:
                    self._stop.wait(self.poll_s)
                    continue
                ranking, ties = self.ranker(task["prompt"], task["completions"])
                status, reply = self._request("/api/rankings", {
                    "task_id": task["task_id"], "policy_version": task["policy_version"],
                    "labeler": self.name, "ranking": ranking, "ties": ties})
                if status == 200:
                    self.counts["labeled"] += 1
                else:
                    self.counts["errors"] += 1
                    log.warning("labeler %s: ranking refused (%d): %s", self.name, status, (reply or {}).get("error"))
            except LabelerTimeout as e:
                self.counts["timeouts"] += 1
                log.warning("%s", e)
                self._stop.wait(self.poll_s)
            except Exception as e:  # noqa: BLE001 - a labeler failure must never reach training
                self.counts["errors"] += 1
                log.warning("labeler %s: %s", self.name, e)
                self._stop.wait(self.poll_s)
