"""The single controller. ``step()`` is the table of contents of one synchronous RL step:

1. sample prompts  2. rollout  3. experience (rewards, old/ref logprobs, values)
4. advantages  5. update (policy, critic)  6. sync weights to the engines (+ checks)  7. metrics

Everything heavy runs in the worker groups; the trainer holds only the run's small state
(step, weight version, prompt position, KL coefficient, reward statistics).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_ray.algo import AdaptiveKLController, FixedKLController
from rlhf_ray.batch import Experience, RolloutSample, pad_samples
from rlhf_ray.config import Config
from rlhf_ray.data.datasets import DataError, tokenize_prompts_with_index
from rlhf_ray.data.sampler import PromptSampler
from rlhf_ray.experience import RunningMoments, compute_advantages, prepare_scores
from rlhf_ray.groups import wait
from rlhf_ray.metrics import MetricsLogger, timed
from rlhf_ray.runtime import Groups
from rlhf_ray.sync.buckets import plan_buckets

log = logging.getLogger(__name__)


class StaleEngineError(RuntimeError):
    """An engine did not report the weight version the trainer just sent."""


class Trainer:
    def __init__(self, cfg: Config, groups: Groups, tokenizer, prompts: list[str], run_dir: Path,
                 eval_prompts: list[str] | None = None):
        self.cfg, self.g, self.tokenizer, self.run_dir = cfg, groups, tokenizer, Path(run_dir)
        self.prompt_ids, kept = tokenize_prompts_with_index(
            tokenizer, prompts, cfg.data.max_prompt_len, cfg.data.overlong_prompt)
        if not self.prompt_ids:
            raise DataError(f"no training prompts left after the '{cfg.data.overlong_prompt}' policy")
        self.prompts = [prompts[i] for i in kept]
        self.skipped_prompts = len(prompts) - len(kept)
        self.eval_prompts = eval_prompts or []
        self.sampler = PromptSampler(len(self.prompt_ids), cfg.trainer.prompts_per_step, cfg.seed)
        a = cfg.algo
        self.kl_ctl = (AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target > 0
                       else FixedKLController(a.kl_coef))
        self.moments = RunningMoments() if cfg.reward.normalize else None
        self.step_index, self.weight_version = 0, 0
        self.engine_versions = dict.fromkeys(groups.rollout.names, 0)
        self.plan = plan_buckets(groups.policy.weight_manifest(), int(cfg.sync.bucket_mb * 2**20))
        self.weight_bytes = sum(m.nbytes for bucket in self.plan for m in bucket)
        if cfg.sync.backend == "collective":
            self._init_weight_group()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        logger = MetricsLogger(self.run_dir, self.cfg.trainer.total_steps, self.step_index)
        history: list[dict] = []
        try:
            while self.step_index < self.cfg.trainer.total_steps:
                metrics = self.step()
                logger.log(self.step_index, metrics)
                history.append(metrics)
        finally:
            logger.close()
        return self.finish(history)

    def step(self) -> dict[str, float]:
        c, t = self.cfg, {}
        start = time.perf_counter()
        # 1. sample prompts
        indices = self.sampler.next_batch()
        prompts = [self.prompts[i] for i in indices]
        # 2. rollout: every engine must hold the current weights
        with timed(t, "rollout"):
            samples = self.g.rollout.generate([self.prompt_ids[i] for i in indices],
                                              seed=c.seed * 1_000_003 + self.step_index * 10_007,
                                              min_version=self.weight_version)
        exp = pad_samples(samples, self.tokenizer.pad_token_id)
        sample_prompts = [prompts[s.prompt_index] for s in samples]
        completions = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        # 3. experience: rewards, then old/ref logprobs and values
        with timed(t, "reward"):
            scored = self.g.reward.score(sample_prompts, completions)
            scores, valid, m = prepare_scores(scored["reward"], c.reward, self.moments, sample_prompts)
        if "gold" in scored:
            m["reward/gold"] = float(torch.tensor(scored["gold"]).nanmean())
        if m["reward/nonfinite"] and c.reward.nan_policy == "skip_step":
            log.warning("step %d skipped: %d non-finite rewards", self.step_index, m["reward/nonfinite"])
            self.step_index += 1
            return {**m, **t, "trainer/skipped": 1.0}
        exp = replace(exp, scores=scores, valid=valid)
        with timed(t, "experience"):
            exp = self._experience(exp)
        # 4. advantages
        with timed(t, "advantages"):
            exp, adv_metrics = compute_advantages(exp, c.algo, self.kl_ctl.value, c.rollout.n_samples_per_prompt)
        # 5. update
        with timed(t, "update"):
            m.update(self.g.policy.update(exp, self.kl_ctl.value))
            if self.g.critic is not None:
                m.update(self.g.critic.update(exp))
        self.kl_ctl.update(adv_metrics["kl/mean"], len(exp))
        # 6. sync: learner -> engines, then check versions and logprobs
        with timed(t, "sync"):
            m.update(self.sync_weights())
            m["rollout/logprob_diff"] = self._logprob_spot_check(samples[: c.sync.check_samples])
        # 7. metrics
        self.step_index += 1
        tokens = float(exp.response_mask.sum())
        m.update(adv_metrics, **t)
        m.update({
            "rollout/samples": float(len(samples)), "rollout/tokens": tokens,
            "rollout/tokens_per_s": tokens / max(t["timing/rollout"], 1e-9),
            "rollout/rollout_logprob_diff": self._rollout_vs_learner(exp),
            "timing/step": time.perf_counter() - start,
        })
        return m

    # ------------------------------------------------------------------ phases
    def _experience(self, exp: Experience) -> Experience:
        old = self.g.policy.compute_logprobs(exp)
        ref = self.g.reference.compute_logprobs(exp)
        values = self.g.critic.compute_values(exp) if self.g.critic is not None else None
        return replace(exp, old_logprobs=old, ref_logprobs=ref, values=values)

    @staticmethod
    def _rollout_vs_learner(exp: Experience) -> float:
        """Mean |vLLM - learner| logprob on this batch's tokens (before the update)."""
        diff = (exp.rollout_logprobs - exp.old_logprobs).abs() * exp.response_mask
        return float(diff.sum() / exp.response_mask.sum().clamp(min=1))

    def _init_weight_group(self) -> None:
        host, port = self.g.policy.address()
        tp = self.cfg.rollout.tensor_parallel_size
        world = 1 + len(self.g.rollout.workers) * tp
        refs = self.g.policy.init_weight_group((host, port, world)) + self.g.rollout.init_weight_group(host, port, tp)
        wait(refs, ["policy-0"] + self.g.rollout.names, "init weight-sync group", self.cfg.cluster.call_timeout_s)

    def sync_weights(self) -> dict[str, float]:
        """Stream the policy's weights to every engine; verify each reports the new version."""
        start = time.perf_counter()
        version = self.weight_version + 1
        policy, rollout = self.g.policy, self.g.rollout
        if self.cfg.sync.backend == "object_store":
            refs = policy.get(policy.send_weights(self.plan, True), "send_weights")[0]
            reported = rollout.get(rollout.receive_weights(self.plan, version, refs), "receive_weights")
        else:
            send = policy.send_weights(self.plan, False)
            receive = rollout.receive_weights(self.plan, version, None)
            results = wait(send + receive, policy.names + rollout.names, "weight sync", self.cfg.cluster.call_timeout_s)
            reported = results[len(send):]
        stale = [f"{n}=v{v}" for n, v in zip(rollout.names, reported, strict=True) if v != version]
        if stale:
            raise StaleEngineError(f"after sync to v{version} engines report {', '.join(stale)}")
        self.weight_version = version
        self.engine_versions = dict(zip(rollout.names, reported, strict=True))
        seconds = time.perf_counter() - start
        return {"rollout/weight_version": float(version), "sync/seconds": seconds,
                "sync/bytes": float(self.weight_bytes), "sync/buckets": float(len(self.plan))}

    def _logprob_spot_check(self, samples: list[RolloutSample]) -> float:
        """Max over engines of the mean |vLLM - learner| logprob on the same tokens, new weights."""
        sequences = [s.prompt_ids + s.response_ids for s in samples]
        engine_logprobs = self.g.rollout.score_tokens(sequences)
        exp = pad_samples(samples, self.tokenizer.pad_token_id)
        learner = self.g.policy.compute_logprobs_replicated(exp)
        worst = 0.0
        for per_engine in engine_logprobs:
            diffs = [abs(e - float(learner[i, j])) for i, (s, lps) in enumerate(zip(samples, per_engine))
                     for j, e in enumerate(lps[-len(s.response_ids):])]
            worst = max(worst, sum(diffs) / max(len(diffs), 1))
        if worst > self.cfg.sync.logprob_check_tol:
            log.warning("rollout/logprob_diff %.2e after sync exceeds %.1e", worst, self.cfg.sync.logprob_check_tol)
        return worst

    # ------------------------------------------------------------------ the end
    def evaluate(self, prompts: list[str], n: int = 1) -> dict[str, float]:
        """Gold and proxy reward of ``n`` samples per held-out prompt from the current policy."""
        ids, kept = tokenize_prompts_with_index(self.tokenizer, prompts, self.cfg.data.max_prompt_len, "truncate")
        samples = self.g.rollout.generate(ids, seed=self.cfg.seed + 7, min_version=self.weight_version, n=n)
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        scored = self.g.reward.score([prompts[kept[s.prompt_index]] for s in samples], texts)
        out = {"eval/reward": float(torch.tensor(scored["reward"]).nanmean())}
        if "gold" in scored:
            out["eval/gold"] = float(torch.tensor(scored["gold"]).nanmean())
        return out

    def finish(self, history: list[dict]) -> dict:
        final = self.run_dir / "final"
        self.g.policy.save_hf(str(final))
        self.tokenizer.save_pretrained(str(final))
        summary = {"steps": self.step_index, "weight_version": self.weight_version,
                   "engine_versions": self.engine_versions, "skipped_prompts": self.skipped_prompts,
                   "final_model": str(final)}
        if history:
            summary["last"] = history[-1]
        if self.eval_prompts:
            summary.update(self.evaluate(self.eval_prompts))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        return summary
