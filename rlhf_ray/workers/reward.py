"""Reward worker: scores (prompt, completion) pairs with one of three kinds of scorer.

- ``model``: a Hugging Face sequence classifier (a scalar reward head, or a classifier whose
  chosen label's logit/probability is the reward: the "sentiment classifier as reward" case);
- ``function``: a Python rule or verifier given by import path ``module:callable``;
- ``http``: a remote reward service (JSON in/out, bearer token from an environment variable;
  ``reward.batch_size`` completions per request, ``reward.max_concurrency`` requests in flight).

Whatever the kind, the result is checked to be one float per completion. A ``model`` reward
also carries the reward-model version that produced it: the feedback loop (rlhf_ray/feedback)
swaps new versions into running workers with ``load_reward_model``, without a restart.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from rlhf_ray.config import RewardConfig
from rlhf_ray.faults import maybe_fail
from rlhf_ray.workers.common import setup_process

Scorer = Callable[[list[str], list[str]], list[float]]


class RewardShapeError(ValueError):
    """A scorer returned something other than one number per completion."""


def load_function(path: str) -> Scorer:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {path!r} cannot be imported: {e}") from e


class ModelScorer:
    def __init__(self, cfg: RewardConfig, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        from rlhf_ray.models import load_reward_model, load_tokenizer

        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.tokenizer = load_tokenizer(cfg.model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "right"
        self.model = load_reward_model(cfg.model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [p + c for p, c in zip(prompts[i : i + self.batch_size], completions[i : i + self.batch_size], strict=True)]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True)
            logits = self.model(**enc).logits.float()
            if self.cfg.label_index < 0:
                scores = logits[:, 0]
            elif self.cfg.use_probability:
                scores = logits.softmax(-1)[:, self.cfg.label_index]
            else:
                scores = logits[:, self.cfg.label_index]
            out.extend(scores.tolist())
        return out


class HttpScorer:
    """POST {"prompts": [...], "completions": [...]} -> {"rewards": [...]}, ``reward.batch_size``
    completions per request and up to ``reward.max_concurrency`` requests in flight (a remote
    judge scores one or a few completions per request and serves a limited number of
    connections: a thread pool keeps that many busy). The first failed request fails the call,
    naming the request and the completions it carried."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.token = os.environ.get(cfg.token_env, "") if cfg.token_env else ""
        if cfg.token_env and not self.token:
            raise ValueError(f"reward.token_env: environment variable {cfg.token_env} is not set")
        self.pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="reward-http")

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        size = self.cfg.batch_size
        starts = range(0, len(prompts), size)
        futures = [
            self.pool.submit(self._request, prompts[i : i + size], completions[i : i + size],
                             f"request {n + 1}/{len(starts)} (completions {i}..{min(i + size, len(prompts)) - 1})")
            for n, i in enumerate(starts)
        ]
        out: list[float] = []
        try:
            for f in futures:
                out.extend(f.result())
        finally:
            for f in futures:  # after a failure, requests not yet sent are not sent
                f.cancel()
        return out

    def _request(self, prompts: list[str], completions: list[str], what: str) -> list[float]:
        body = json.dumps({"prompts": prompts, "completions": completions}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: Exception | None = None
        for attempt in range(self.cfg.retries):
            request = urllib.request.Request(self.cfg.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    rewards = json.loads(response.read())["rewards"]
                return check_rewards(rewards, len(prompts), f"reward service {self.cfg.url} {what}")
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500 and e.code != 429:  # client errors will not heal by retrying
                    break
            except (urllib.error.URLError, TimeoutError, KeyError, json.JSONDecodeError) as e:
                last = e
            time.sleep(min(2.0**attempt * 0.2, 5.0))
        raise RuntimeError(f"reward service {self.cfg.url} {what} failed after {attempt + 1} attempt(s): {last}")


def build_scorer(cfg: RewardConfig, **model_kwargs) -> Scorer:
    if cfg.kind == "model":
        return ModelScorer(cfg, **model_kwargs)
    if cfg.kind == "http":
        return HttpScorer(cfg)
    return load_function(cfg.function)


def check_rewards(rewards, n: int, source: str) -> list[float]:
    """One real number per completion (NaN/Inf pass through: the trainer's policy handles them)."""
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.tolist()
    if not isinstance(rewards, list | tuple) or len(rewards) != n:
        got = f"{type(rewards).__name__} of length {len(rewards)}" if hasattr(rewards, "__len__") else repr(rewards)
        raise RewardShapeError(f"{source} returned {got} for {n} completions; expected {n} numbers")
    try:
        return [float(r) for r in rewards]
    except (TypeError, ValueError) as e:
        raise RewardShapeError(f"{source} returned a non-numeric reward: {e}") from e


class RewardWorker:
    def __init__(self, name: str, cfg: RewardConfig, *, threads: int = 1, seed: int = 0,
                 trust_remote_code: bool = False):
        setup_process(threads, seed)
        self.name, self.cfg, self.trust_remote_code = name, cfg, trust_remote_code
        self.scorer = build_scorer(cfg, trust_remote_code=trust_remote_code) if cfg.kind == "model" else build_scorer(cfg)
        self.gold = load_function(cfg.gold_function) if cfg.gold_function else None
        self.model_version = 0  # reward-model version (0 = cfg.model_path; the feedback loop loads newer ones)

    def __repr__(self) -> str:
        return f"RewardWorker({self.name}, {self.cfg.kind})"

    def score(self, prompts: list[str], completions: list[str]) -> dict[str, list[float]]:
        """``{"reward": [...]}`` plus ``"gold"`` when a gold labeler is configured and, for a
        reward model, ``"model_version"``: the version that scored each completion."""
        source = f"{self.name} ({self.cfg.kind} reward)"
        out = {"reward": check_rewards(self.scorer(prompts, completions), len(prompts), source)}
        if self.cfg.kind == "model":
            out["model_version"] = [float(self.model_version)] * len(prompts)
        maybe_fail(self.name, "score")
        if self.gold is not None:
            gold = check_rewards(self.gold(prompts, completions), len(prompts), f"{self.name} (gold)")
            out["gold"] = [g if math.isfinite(g) else float("nan") for g in gold]
        return out

    def load_reward_model(self, path: str, version: int) -> int:
        """Score with the reward model at ``path`` from now on, as ``version`` (in place: the
        worker keeps running; the old model is dropped once the new one has loaded)."""
        if self.cfg.kind != "model":
            raise ValueError(f"{self.name}: reward.kind={self.cfg.kind} has no reward model to replace")
        self.scorer = ModelScorer(replace(self.cfg, model_path=path), trust_remote_code=self.trust_remote_code)
        self.model_version = int(version)
        return self.model_version

    def reward_model_version(self) -> int:
        return self.model_version
