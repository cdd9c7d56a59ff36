"""In-process stand-ins for the worker groups, for controller tests without Ray
(tests/test_trainer.py, tests/test_async_controller.py): plain Python objects with the methods
the trainer calls on the real groups (rlhf_ray/groups.py); no model runs.

Samples are a pure function of (seed, prompt index) as with vLLM's per-request seeds; the
reference's logprobs sit ``kl_per_token`` below the policy's, so the k1 KL of a sequence is
``kl_per_token x response length`` exactly; rewards come from a script.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_ray.batch import RolloutSample
from rlhf_ray.calls import Ready
from rlhf_ray.groups import WorkerError
from rlhf_ray.sync.buckets import TensorMeta

RESPONSE_LEN = 3
PROMPTS = [f"rev {w}=" for w in ("abc", "de", "fgh", "ij", "klm", "nop", "qr", "stu")]


class Failed(Ready):
    """A submitted call that failed like a crashed worker."""

    def __init__(self, error):
        super().__init__(None)
        self.error = error

    def result(self):
        raise self.error


class FakeRollout:
    """Two engines. ``fail_next`` makes the next generate die like a crashed engine: Ray restarts
    it holding the initial weights (v0), and the call raises ``WorkerError``."""

    def __init__(self, n_samples: int):
        self.names = ["rollout-0", "rollout-1"]
        self.workers = [self]  # one share per batch: this stand-in answers for both engines
        self.n_samples, self.fail_next = n_samples, 0
        self.held = dict.fromkeys(self.names, 0)
        self.returned: list[list[RolloutSample]] = []  # what each successful generate returned
        self.generate_calls = 0
        self.requests: list[tuple[int, int | None, int]] = []  # (prompts, n, min_version) per generate

    def generate(self, prompt_ids, *, seed, min_version, n=None):
        self.generate_calls += 1
        self.requests.append((len(prompt_ids), n, min_version))
        if self.fail_next:
            self.fail_next -= 1
            self.held["rollout-1"] = 0
            raise WorkerError("rollout.generate failed on 'rollout-1': the actor died")
        stale = [name for name, v in self.held.items() if v < min_version]
        if stale:
            raise WorkerError(f"rollout.generate failed on {stale[0]!r}: holds an older version than v{min_version}")
        samples = []
        for i, ids in enumerate(prompt_ids):
            rng = random.Random(seed + i)  # per-prompt seed: a retry draws the same tokens
            for _ in range(n or self.n_samples):
                response = [rng.randrange(4, 30) for _ in range(RESPONSE_LEN)]
                samples.append(RolloutSample(i, list(ids), response, [-1.5] * RESPONSE_LEN, min(self.held.values()),
                                             self.names[i % 2]))
        self.returned.append(samples)
        return samples

    def submit_generate(self, engine, prompt_ids, prompt_indices, *, seed, min_version, n=None, chunk_tokens=0,
                        wait_s=0.0):
        try:
            return Ready(self.generate(prompt_ids, seed=seed, min_version=min_version, n=n))
        except WorkerError as e:
            return Failed(e)

    def busy_seconds(self):
        return [0.0]

    def versions(self, timeout_s=None):
        return list(self.held.values())

    def receive_weights(self, plan, version, refs, check=None, adapter=None):
        self.held = dict.fromkeys(self.names, version)
        return [(version, [[-1.5] * (len(s) - 1) for s in check or []]) for _ in self.names]

    def get(self, refs, what):
        return refs

    def score_tokens(self, sequences):
        return [[[-1.5] * (len(s) - 1) for s in sequences] for _ in self.names]


class FakeReward:
    """``script(call_index, completions) -> rewards``; gold is the reward plus one."""

    def __init__(self, script=None):
        self.script = script or (lambda call, texts: [float(sum(map(ord, t)) % 7) / 7 for t in texts])
        self.calls = 0

    def submit_score(self, prompts, completions):
        return Ready(self.score(prompts, completions))

    def score(self, prompts, completions):
        rewards = self.script(self.calls, completions)
        self.calls += 1
        return {"reward": rewards, "gold": [r + 1.0 for r in rewards]}


class FakeReference:
    def __init__(self, kl_per_token: float = 0.0):
        self.kl_per_token = kl_per_token

    def submit_logprobs(self, exp):
        return Ready(self.compute_logprobs(exp))

    def compute_logprobs(self, exp):
        return (exp.rollout_logprobs - self.kl_per_token) * exp.response_mask


class FakePolicy:
    """``nonfinite`` lists, per update call, how many optimizer steps were skipped (default 0)."""

    def __init__(self, nonfinite=()):
        self.names = ["policy-0"]
        self.nonfinite = list(nonfinite)
        self.updates: list[float] = []  # the kl_coef of each update
        self.loaded: list[str] = []
        self.old_logprob_passes = 0  # submit_logprobs calls: the pass a single on-policy update skips

    def weight_manifest(self):
        return [TensorMeta("model.w", (4,), "float32")]

    def adapter_config(self):
        return None  # full weights, no LoRA adapter

    def send_weights(self, plan, use_object_store):
        return [["bucket-refs"]]

    def get(self, refs, what):
        return refs

    def compute_logprobs(self, exp):
        return exp.rollout_logprobs.clone()

    def submit_logprobs_replicated(self, exp):
        return Ready(self.compute_logprobs(exp))

    def submit_logprobs(self, exp):
        self.old_logprob_passes += 1
        return Ready(self.compute_logprobs(exp))

    def submit_update(self, exp, kl_coef):
        return Ready(self.update(exp, kl_coef))

    def update(self, exp, kl_coef):
        skipped = self.nonfinite[len(self.updates)] if len(self.updates) < len(self.nonfinite) else 0
        self.updates.append(kl_coef)
        return {"policy/loss": 0.5, "policy/nonfinite_steps": float(skipped)}

    def save_checkpoint(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "weights").write_text(str(len(self.updates)))

    def load_checkpoint(self, path):
        self.loaded.append(path)

    def save_hf(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
