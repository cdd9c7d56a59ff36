"""The single controller. ``step()`` is the table of contents of one RL step:

1. sample prompts  2. rollout  3. experience (rewards, old/ref logprobs, values)
4. advantages  5. update (policy, critic)  6. sync weights to the engines (+ checks)  7. metrics

``trainer.max_staleness = 0`` runs the phases one after the other. With ``k >= 1`` the same
loop keeps up to ``k + 1`` batches in flight (``RolloutStream``): the engines generate the next
batches while the learner trains, new weights load between generation chunks, and the
``VersionLedger`` bounds every trained token's staleness by ``k``.

Everything heavy runs in the worker groups; the trainer holds only the run's small state
(step, weight version, prompt position, KL coefficient, reward statistics), which it saves in
every checkpoint together with the learners' DeepSpeed checkpoints.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

import torch

from rlhf_ray import checkpoint as ckpt
from rlhf_ray import storage
from rlhf_ray.algo import AdaptiveKLController, FixedKLController
from rlhf_ray.algo.overoptimization import proxy_gold_divergence
from rlhf_ray.batch import Experience, pad_samples
from rlhf_ray.config import Config, config_hash, redacted
from rlhf_ray.data.chat import PromptInput, render_prompt
from rlhf_ray.data.datasets import DataError, tokenize_prompts_with_index
from rlhf_ray.data.sampler import PromptSampler
from rlhf_ray.experience import RunningMoments, compute_advantages, prepare_scores
from rlhf_ray.faults import maybe_fail
from rlhf_ray.groups import Pending, WorkerError
from rlhf_ray.metrics import MetricsLogger, timed
from rlhf_ray.rollout_stream import RolloutStream
from rlhf_ray.runtime import Groups
from rlhf_ray.sync.coordinator import WeightSync

log = logging.getLogger(__name__)


def seconds_since_launch() -> float:
    """Seconds since this process started (the driver's launch)."""
    import psutil

    return time.time() - psutil.Process().create_time()


class TrainingAborted(RuntimeError):
    """A numerical guard stopped the run (KL ceiling, repeated non-finite updates)."""


def scored_by_current_reward_model(history: list[dict]) -> list[dict]:
    """The trailing rows of ``history`` whose proxy reward came from the reward-model version in
    use at the last row (``reward/model_version``; all rows when there is no such metric). The
    row where a new version first appears was still scored by the previous one: the feedback
    loop swaps after the step."""
    version = history[-1].get("reward/model_version") if history else None
    if version is None:
        return history
    first = next(i for i, h in enumerate(history) if h.get("reward/model_version") == version)
    return history[first + 1 :] if first else history


class Trainer:
    def __init__(self, cfg: Config, groups: Groups, tokenizer, prompts: list[str], prompt_ids: list[list[int]],
                 run_dir: Path, eval_prompts: list[PromptInput] | None = None):
        """``prompts``: the text each prompt stands for (what rewards see: raw text, or chat
        messages rendered through the template, see ``data.chat.render_prompt``) and their token
        ids (``prompt_ids[i]`` encodes ``prompts[i]``, already within ``data.max_prompt_len``)."""
        self.cfg, self.g, self.tokenizer, self.run_dir = cfg, groups, tokenizer, Path(run_dir)
        if not prompt_ids or len(prompts) != len(prompt_ids):
            raise DataError(f"{len(prompts)} prompts and {len(prompt_ids)} token lists: need as many, at least one")
        self.prompts, self.prompt_ids = prompts, prompt_ids
        self.eval_prompts = eval_prompts or []
        self.sampler = PromptSampler(len(self.prompt_ids), cfg.trainer.prompts_per_step, cfg.seed)
        a = cfg.algo
        self.kl_ctl = (AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.kl_target > 0
                       else FixedKLController(a.kl_coef))
        self.moments = RunningMoments() if cfg.reward.normalize else None
        self.step_index, self.weight_version, self.nonfinite_streak = 0, 0, 0
        # a local directory or a URI (s3://...): checkpoints and the final model go there directly
        self.output_root = cfg.trainer.output_dir if storage.is_uri(cfg.trainer.output_dir) else str(self.run_dir)
        self.checkpoint_root = cfg.trainer.checkpoint_dir or storage.join(self.output_root, "checkpoints")
        self.sync = WeightSync(groups.policy, groups.rollout, cfg.sync, timeout_s=cfg.cluster.call_timeout_s,
                               tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                               pad_id=tokenizer.pad_token_id)
        t = cfg.trainer
        self.stream = RolloutStream(groups.rollout, groups.reward, self.sync, tokenizer, prompts, prompt_ids,
                                    samples_per_prompt=cfg.rollout.n_samples_per_prompt, max_staleness=t.max_staleness,
                                    chunk_tokens=cfg.rollout.chunk_tokens, max_repairs=t.max_engine_repairs,
                                    wait_s=cfg.cluster.call_timeout_s)
        self.reissue: list[dict] = []  # in-flight batches of the checkpoint resumed from
        self.update_spans: deque[tuple[float, float]] = deque(maxlen=8)  # wall-clock learner updates
        self.busy_mark: tuple[float, list[float]] | None = None  # (time, each engine's busy seconds) last step
        self.stop_requested = False
        self.feedback = None  # the human feedback loop (rlhf_ray/feedback), when feedback.enabled
        if cfg.feedback.enabled:
            from rlhf_ray.feedback.loop import FeedbackLoop

            self.feedback = FeedbackLoop(cfg, groups, tokenizer, prompts, prompt_ids, self.run_dir)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        self.maybe_resume()
        self.startup = {f"{role}_init_s": s for role, s in self.g.init_seconds.items()}
        self.startup["to_first_step_s"] = seconds_since_launch()
        log.info("start-up: %s", ", ".join(f"{k} {v:.1f}" for k, v in self.startup.items()))
        wandb = redacted(asdict(self.cfg)) if self.cfg.trainer.wandb else None
        logger = MetricsLogger(self.run_dir, self.cfg.trainer.total_steps, self.step_index, wandb_config=wandb)
        history: list[dict] = []
        budget = self.cfg.trainer.stop_after_steps or self.cfg.trainer.total_steps
        with self._sigterm_stops():
            try:
                while self.step_index < self.cfg.trainer.total_steps and len(history) < budget:
                    metrics = self.step()
                    if self.feedback is not None:
                        metrics.update(self.feedback.after_step(self.step_index, self.weight_version))
                    k = self.cfg.trainer.eval_every  # held-out gold/proxy, logged as eval/* in this step's row
                    if k and self.eval_prompts and self.step_index % k == 0:
                        metrics.update(self.evaluate(self.eval_prompts))
                    logger.log(self.step_index, metrics)
                    history.append(metrics)
                    self._guards(metrics)
                    self._warn_overoptimization(history)
                    every = self.cfg.trainer.save_every
                    if self.stop_requested or (every and self.step_index % every == 0):
                        self.save_checkpoint()
                    if self.stop_requested:
                        break
            finally:
                logger.close()
                if self.feedback is not None:
                    self.feedback.close()
        self._finish_push()  # the last in-flight push (max_staleness > 0): engines report it
        if self.step_index < self.cfg.trainer.total_steps:  # stopped early: checkpoint, no final model
            if not ckpt.is_complete(ckpt.step_dir(self.checkpoint_root, self.step_index)):
                self.save_checkpoint()
            return {"steps": self.step_index, "stopped": True, "weight_version": self.weight_version,
                    "startup": self.startup}
        return self.finish(history)

    def step(self) -> dict[str, float]:
        c, t = self.cfg, {}
        start = time.perf_counter()
        # 1. sample prompts: keep max_staleness + 1 batches in flight (1 = synchronous)
        fill = self._fill_buffer()
        # 2. rollout: the oldest batch, its shares scored as they arrived (restarted engines repaired)
        with timed(t, "rollout"):
            batch = self.stream.take()
            samples = batch.samples
            exp = pad_samples(samples, self.tokenizer.pad_token_id)
        # 3. experience: old/ref logprobs and values (they need no rewards) start at once and run
        # while the rewards are scored
        forwards = self._submit_experience(exp)
        with timed(t, "reward"):
            scored = batch.scores()
        scores, valid, m = prepare_scores(scored["reward"], c.reward, self.moments, batch.prompts)
        if "gold" in scored:
            m["reward/gold"] = float(torch.tensor(scored["gold"]).nanmean())
        if m["reward/nonfinite"] and c.reward.nan_policy == "skip_step":
            log.warning("step %d skipped: %d non-finite rewards", self.step_index + 1, m["reward/nonfinite"])
            self.stream.wait(forwards)  # the workers are done with this batch before the next starts
            self.step_index += 1
            return {**m, **t, "trainer/skipped": 1.0}
        valid, m_stale = self._staleness(exp, valid)
        with timed(t, "experience"):
            old, ref, values = self.stream.wait(forwards)
            exp = replace(exp, scores=scores, valid=valid, old_logprobs=old, ref_logprobs=ref, values=values)
        # 4. advantages
        with timed(t, "advantages"):
            exp, adv_metrics = compute_advantages(exp, c.algo, self.kl_ctl.value, c.rollout.n_samples_per_prompt)
        # 5. update: policy and critic at once
        with timed(t, "update"):
            span = time.time()
            critic = self.g.critic.submit_update(exp) if self.g.critic is not None else None
            for r in self.stream.wait([self.g.policy.submit_update(exp, self.kl_ctl.value), critic]):
                m.update(r or {})
            self.update_spans.append((span, time.time()))
        self.kl_ctl.update(adv_metrics["kl/mean"], len(exp))
        # 6. sync: learner -> engines as the next version; every engine must report it (with
        # max_staleness > 0 the push completes while the engines generate; checked before the next)
        with timed(t, "sync"):
            check = samples[: c.sync.check_samples]
            if self.stream.asynchronous:
                m.update(self._finish_push())
                self.sync.start(self.weight_version + 1, check)
            else:
                m.update(self.sync.push(self.weight_version + 1, check))
            self.weight_version += 1
        # 7. metrics
        self.step_index += 1
        tokens = float(exp.response_mask.sum())
        m.update(adv_metrics, **t, **m_stale, **self._busy(t, start, fill, samples))
        step_s = time.perf_counter() - start
        # synchronous: generation speed; asynchronous (generation hidden behind the learner): tokens per step second
        per_s = step_s if self.stream.asynchronous else t["timing/rollout"]
        m.update({
            "rollout/samples": float(len(samples)), "rollout/tokens": tokens,
            "rollout/prompt_tokens": float(sum(len(s.prompt_ids) for s in samples)),
            "rollout/tokens_per_s": tokens / max(per_s, 1e-9),
            "rollout/prompt_indices": batch.indices,
            "timing/step": step_s,
        })
        if exp.old_logprobs is not None:
            m["rollout/behavior_logprob_diff"] = self._rollout_vs_learner(exp)
        return m

    # ------------------------------------------------------------------ phases
    def _fill_buffer(self) -> float:
        """Submit batches until ``max_staleness + 1`` are in flight (checkpointed ones first);
        returns the buffer's fill before the oldest is taken."""
        while self.stream.buffer.has_room():
            step = self.step_index + len(self.stream.buffer)  # the step that will train on it
            if self.reissue:
                b = self.reissue.pop(0)
                self.stream.submit(b["indices"], b["seed"], self.weight_version, b["min_version"])
            else:
                self.stream.submit(self.sampler.next_batch(), self.cfg.seed * 1_000_003 + step * 10_007,
                                   self.weight_version)
        return self.stream.buffer.fill()

    def _finish_push(self) -> dict[str, float]:
        """The previous in-flight push; an engine that died meanwhile gets the next push once
        Ray restarted it, and its lost share is re-issued when the batch is taken."""
        try:
            return self.sync.finish()
        except WorkerError as e:
            log.warning("weight push failed on a dead engine (%s); it is repaired with the next batch", e)
            return {}

    def _staleness(self, exp: Experience, valid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token staleness against the weights this update starts from; rows beyond the
        bound (none, unless throttling failed) are dropped and counted."""
        ledger = self.stream.ledger
        s = ledger.staleness(exp.token_versions, exp.response_mask, self.weight_version)
        beyond = ledger.rows_beyond(exp.token_versions, exp.response_mask, self.weight_version)
        if beyond.any():
            log.warning("%d samples older than trainer.max_staleness=%d dropped", int(beyond.sum()),
                        ledger.max_staleness)
        return valid * ~beyond, {"rollout/staleness_mean": s.mean, "rollout/staleness_max": float(s.max),
                                 "rollout/dropped_samples": float(beyond.sum())}

    def _single_on_policy_pass(self, exp: Experience) -> bool:
        """The update's own first forward gives the old logprobs (one epoch, one minibatch,
        every token generated by the current weights): computing them first is redundant."""
        on_policy = bool((exp.token_versions[exp.response_mask.bool()] == self.weight_version).all())
        return self.cfg.algo.schedule == (1, 1) and on_policy

    def _submit_experience(self, exp: Experience) -> list[Pending | None]:
        """The old-logprob (unless redundant), reference and value forwards of ``exp``, on
        their groups at once; ``None`` where a pass does not run."""
        old = None if self._single_on_policy_pass(exp) else self.g.policy.submit_logprobs(exp)
        ref = self.g.reference.submit_logprobs(exp)
        values = self.g.critic.submit_values(exp) if self.g.critic is not None else None
        return [old, ref, values]

    def _busy(self, t: dict[str, float], start: float, fill: float, samples: list) -> dict[str, float]:
        """Dashboard numbers of this step: engines' and learner's busy fractions, buffer fill,
        samples in flight, and the seconds of generation that overlapped learner updates."""
        now = time.perf_counter()
        out = {"rollout/buffer_fill": fill, "rollout/samples_in_flight": float(self.stream.samples_in_flight()),
               "learner/busy_fraction": (t["timing/experience"] + t["timing/update"]) / max(now - start, 1e-9)}
        try:
            busy = self.g.rollout.busy_seconds()
        except WorkerError:  # an engine is restarting: no busy fraction this step
            busy = None
        if busy is not None and self.busy_mark is not None:
            # a restarted engine counts from zero again
            gained = sum(b - a if b >= a else b for a, b in zip(self.busy_mark[1], busy, strict=True))
            out["rollout/busy_fraction"] = gained / max((now - self.busy_mark[0]) * len(busy), 1e-9)
        self.busy_mark = (now, busy) if busy is not None else None
        spans = {(s.engine, s.started, s.finished) for s in samples}
        out["rollout/overlap_s"] = sum(max(0.0, min(f, u1) - max(s0, u0)) for _, s0, f in spans
                                       for u0, u1 in self.update_spans)
        return out

    @staticmethod
    def _rollout_vs_learner(exp: Experience) -> float:
        """Mean |vLLM - learner| logprob on this batch's tokens (before the update)."""
        diff = (exp.rollout_logprobs - exp.old_logprobs).abs() * exp.response_mask
        return float(diff.sum() / exp.response_mask.sum().clamp(min=1))

    def _guards(self, m: dict[str, float]) -> None:
        ceiling = self.cfg.algo.kl_ceiling
        if ceiling and m.get("kl/mean", 0.0) > ceiling:
            raise TrainingAborted(f"step {self.step_index}: kl/mean {m['kl/mean']:.3f} exceeds algo.kl_ceiling={ceiling}")
        skipped = m.get("policy/nonfinite_steps", 0.0) + m.get("critic/nonfinite_steps", 0.0)
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        if skipped:
            log.warning("step %d: %d optimizer steps skipped for non-finite loss/gradient", self.step_index, skipped)
        if self.nonfinite_streak >= self.cfg.trainer.max_nonfinite_updates:
            raise TrainingAborted(f"{self.nonfinite_streak} updates in a row had non-finite losses or gradients "
                                  f"(trainer.max_nonfinite_updates={self.cfg.trainer.max_nonfinite_updates})")

    @staticmethod
    def _warn_overoptimization(history: list[dict]) -> None:
        """Warn when the gold score fell from its peak while the proxy reward (``reward/mean``) did
        not (reward over-optimisation, Gao et al. 2022); once per episode, at its onset. Only the
        steps scored by the reward model now in use count: a new version (feedback loop) changes
        the proxy's scale, and over-optimising it starts afresh."""
        rows = scored_by_current_reward_model(history)
        proxy = [h.get("reward/mean", float("nan")) for h in rows]
        gold = [h.get("reward/gold", float("nan")) for h in rows]
        d = proxy_gold_divergence(proxy, gold)
        if d and not proxy_gold_divergence(proxy[:-1], gold[:-1]):
            log.warning("reward over-optimisation? reward/gold fell %.1f step-noise units below its peak "
                        "%d steps ago while the proxy reward (reward/mean) did not fall (%+.1f units)",
                        d.gold_drop, len(rows) - 1 - d.peak_step, d.proxy_change)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"step": self.step_index, "weight_version": self.weight_version, "sampler": self.sampler.state_dict(),
                "kl_controller": self.kl_ctl.state_dict(), "config_hash": config_hash(self.cfg),
                "in_flight": self.stream.in_flight(),
                "reward_moments": self.moments.state_dict() if self.moments else None,
                "nonfinite_streak": self.nonfinite_streak,
                "feedback": self.feedback.state_dict() if self.feedback is not None else None}

    def save_checkpoint(self) -> str:
        path = ckpt.step_dir(self.checkpoint_root, self.step_index)
        self.g.policy.save_checkpoint(storage.join(path, "policy"))  # every rank uploads its shard
        if self.g.critic is not None:
            self.g.critic.save_checkpoint(storage.join(path, "critic"))
        if self.feedback is not None:  # a local checkpoint dir (config_errors refuses URIs with feedback)
            self.feedback.save(Path(storage.join(path, "feedback")))
        ckpt.write_driver_state(path, self.state_dict())
        if self.output_root != str(self.run_dir):  # a URI: the metrics so far, before the marker,
            storage.upload(self.run_dir, self.output_root)  # so a resumed job in a new directory has them
        maybe_fail("driver", "checkpoint")
        ckpt.mark_complete(path, self.step_index)  # last: only now does the checkpoint count
        ckpt.prune(self.checkpoint_root, self.cfg.trainer.keep_checkpoints)
        log.info("checkpoint %s", path)
        return path

    def maybe_resume(self) -> None:
        resume = self.cfg.trainer.resume
        path = None if resume == "never" else ckpt.latest(self.checkpoint_root) if resume == "auto" else resume
        if path is None:
            return
        if not ckpt.is_complete(path):
            raise FileNotFoundError(f"trainer.resume: {path} is not a complete checkpoint (no {ckpt.MARKER})")
        state = ckpt.read_driver_state(path)
        ckpt.check_config(state, config_hash(self.cfg), self.cfg.trainer.resume_ignore_config, path)
        self.g.policy.load_checkpoint(storage.join(path, "policy"))
        if self.g.critic is not None:
            self.g.critic.load_checkpoint(storage.join(path, "critic"))
        self.step_index, self.weight_version = state["step"], state["weight_version"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.sampler.load_state_dict(state["sampler"])
        self.reissue = list(state.get("in_flight", []))  # generated again, from the resumed weights
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.moments is not None and state["reward_moments"]:
            self.moments.load_state_dict(state["reward_moments"])
        if self.feedback is not None and state.get("feedback"):
            self.feedback.load(Path(storage.join(path, "feedback")), state["feedback"])
        self._fetch_metrics()
        self.sync.push(self.weight_version)  # engines start from the initial weights: re-send
        log.info("resumed from %s at step %d (weights v%d)", path, self.step_index, self.weight_version)

    def _fetch_metrics(self) -> None:
        """Resuming a run whose outputs are on a URI from a new local directory (a resubmitted
        job): start from the uploaded ``metrics.jsonl`` (the logger drops the rows to redo)."""
        local, remote = self.run_dir / "metrics.jsonl", storage.join(self.output_root, "metrics.jsonl")
        if self.output_root != str(self.run_dir) and not local.exists() and storage.exists(remote):
            local.write_text(storage.read_text(remote), encoding="utf-8")

    def _sigterm_stops(self):
        """SIGTERM (preemption, ``ray job stop``) finishes the current step, checkpoints, stops."""
        import contextlib

        if threading.current_thread() is not threading.main_thread():
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def handler():
            def request_stop(signum, frame):
                log.warning("SIGTERM: stopping after this step with a checkpoint")
                self.stop_requested = True

            previous = signal.signal(signal.SIGTERM, request_stop)
            try:
                yield
            finally:
                signal.signal(signal.SIGTERM, previous)

        return handler()

    # ------------------------------------------------------------------ the end
    def evaluate(self, prompts: list[PromptInput], n: int = 1) -> dict[str, float]:
        """Gold and proxy reward of ``n`` samples per held-out prompt from the current policy."""
        ids, kept = tokenize_prompts_with_index(self.tokenizer, prompts, self.cfg.data.max_prompt_len, "truncate")
        samples = self.g.rollout.generate(ids, seed=self.cfg.seed + 7, min_version=self.weight_version, n=n)
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        scored = self.g.reward.score([render_prompt(self.tokenizer, prompts[kept[s.prompt_index]]) for s in samples], texts)
        out = {"eval/reward": float(torch.tensor(scored["reward"]).nanmean())}
        if "gold" in scored:
            out["eval/gold"] = float(torch.tensor(scored["gold"]).nanmean())
        return out

    def finish(self, history: list[dict]) -> dict:
        final = storage.join(self.output_root, "final")
        self.g.policy.save_hf(final)
        with storage.local_dir(final) as local:
            self.tokenizer.save_pretrained(local)
        summary = {"steps": self.step_index, "weight_version": self.weight_version,
                   "engine_versions": self.sync.engine_versions, "final_model": str(final), "startup": self.startup}
        if history:
            summary["last"] = history[-1]
        if self.eval_prompts:
            summary.update(self.evaluate(self.eval_prompts))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        if self.output_root != str(self.run_dir):  # metrics, TensorBoard, summary next to final/
            storage.upload(self.run_dir, self.output_root)
        return summary
