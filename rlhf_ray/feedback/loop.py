"""The feedback loop: labels on the current policy's samples retrain the reward model during RL.

The trainer calls :meth:`FeedbackLoop.after_step` once per step (and saves/loads its state
with every checkpoint). Every ``feedback.every`` steps it samples ``prompts_per_round`` prompts
and up to ``k`` distinct fresh completions each from the rollout engines (the current policy, tagged with its
weight version) and hands them to the feedback service as labeling tasks. Labels arrive in the
background (people on the page, or a machine labeler thread); training never waits for them
unless ``feedback.wait=true`` (then each round waits until its tasks are labeled). Once ``min_labels`` new comparisons are in, the reward model's
DeepSpeed group (warm: it holds the deployed version's weights and optimizer state) trains on
the preference pairs of the comparisons so far except the held-out ones (every
``heldout_every``-th ranking; pairs inside a tie are left out): those the deployed version has
not learned from, plus ``replay`` times as many drawn from the older ones; and the candidate
is compared with the deployed version on the held-out comparisons (pairwise accuracy, the same
evaluation as ``python -m rlhf_ray.reward_model``). A better-or-equal candidate becomes the next
version and every reward worker loads it in place; a worse one is discarded (the group goes
back to the deployed weights).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import time
from pathlib import Path

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlhf_ray.config import Config
from rlhf_ray.feedback.labelers import LabelerThread, build_labeler
from rlhf_ray.feedback.service import FeedbackService

log = logging.getLogger(__name__)
MAX_RM_LEN = 4096  # rows are prompt + completion text; the model's own limit applies


def as_pairs(comparisons) -> tuple[list[str], list[list[str]]]:
    """Every ranking as its ``C(k, 2)`` ``[better, worse]`` pairs (prompts repeated alongside),
    minus the pairs inside a tied group: tasks rank 2..k completions, and the reward model's
    batches need one k. The pair loss is the ranking loss (``algo.losses.ranking_loss``
    averages over the same pairs)."""
    from rlhf_ray.algo.losses import ranking_pairs

    prompts, pairs = [], []
    for c in comparisons:
        for i, j in ranking_pairs(len(c.ranked)):
            if all(p in c.ties for p in range(i, j)):
                continue  # i ~ i+1 ~ ... ~ j: no preference
            prompts.append(c.prompt)
            pairs.append([c.ranked[i], c.ranked[j]])
    return prompts, pairs


class FeedbackLoop:
    def __init__(self, cfg: Config, groups, tokenizer, prompts: list[str], prompt_ids: list[list[int]],
                 run_dir: Path):
        self.cfg, self.f, self.g, self.tokenizer = cfg, cfg.feedback, groups, tokenizer
        self.prompts, self.prompt_ids = prompts, prompt_ids
        self.dir = Path(run_dir).absolute() / "feedback"
        self.db_path = Path(self.f.db_path).absolute() if self.f.db_path else self.dir / "labels.db"
        self.version, self.version_path = 0, cfg.reward.model_path
        self.trained_through = 0  # comparisons with id <= this went into a retraining (deployed or not)
        self.deployed_through = 0  # comparisons with id <= this went into the deployed version
        self.heldout_accuracy = math.nan
        self.counts = {"rejected_versions": 0, "wait_timeouts": 0, "rounds": 0, "worker_reloads": 0,
                       "skipped_prompts": 0}
        self.service = self.labeler = self.rm = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the service (on the driver's node, so that loopback reaches it), the machine
        labeler, and the reward model's DeepSpeed group."""
        if self.service is not None:
            return
        from rlhf_ray.stage import start_group
        from rlhf_ray.workers.supervised import RewardModelWorker

        self.dir.mkdir(parents=True, exist_ok=True)
        token = os.environ.get(self.f.token_env, "") if self.f.token_env else ""
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.service = ray.remote(FeedbackService).options(num_cpus=0, scheduling_strategy=here).remote(
            str(self.db_path), host=self.f.host, port=self.f.port, token=token, task_ttl_s=self.f.task_ttl_s)
        self.url = ray.get(self.service.url.remote(), timeout=self.cfg.cluster.call_timeout_s)
        log.info("feedback service: labeling page at %s/%s, database %s", self.url,
                 f"#token=<${self.f.token_env}>" if token else "", self.db_path)
        ranker = build_labeler(self.f, self.cfg.seed)
        if ranker is not None:
            self.labeler = LabelerThread(self.url, ranker, name=self.f.labeler, token=token)
        c = self.cfg
        self.rm = start_group("reward_model", RewardModelWorker, self.f.learner, c.cluster, c.reward.model_path,
                              dtype=c.model.dtype, seed=c.seed, total_optimizer_steps=10**6,
                              trust_remote_code=c.model.trust_remote_code)

    def close(self) -> None:
        if self.labeler is not None:
            self.labeler.stop()
        if self.service is not None:
            try:
                ray.get(self.service.close.remote(), timeout=30)
            except ray.exceptions.RayError:
                pass
            ray.kill(self.service)
        if self.rm is not None:
            # kept for a checkpoint written after the loop stopped (the trainer's final one)
            self.rm.save_checkpoint(str(self.dir / "last"))
            self.rm.shutdown()
        self.service = self.labeler = self.rm = None

    # ------------------------------------------------------------------ the hook
    def after_step(self, step: int, weight_version: int) -> dict[str, float]:
        """One step's share of the loop; returns its metrics."""
        start = time.perf_counter()
        self.start()
        m: dict[str, float] = {}
        if step % self.f.every == 0:
            self.send_round(step, weight_version)
            if self.f.wait:
                self.wait_for_labels()
        if self.new_labels() >= self.f.min_labels:
            m.update(self.retrain())
        m.update(self.metrics())
        m["timing/feedback"] = time.perf_counter() - start
        return m

    def send_round(self, step: int, weight_version: int) -> None:
        """``prompts_per_round`` prompts x up to ``k`` distinct fresh completions of the current
        policy, as tasks. 2k are sampled per prompt and the first k distinct texts kept; a prompt
        with fewer than 2 distinct ones is skipped (identical completions cannot be ranked, and
        their random order would only teach the reward model noise). Requiring all k would skip
        most prompts of a policy that has sharpened, exactly the one whose blind spots need labels."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)
        picked = torch.randperm(len(self.prompts), generator=gen)[: self.f.prompts_per_round].tolist()
        samples = self.g.rollout.generate([self.prompt_ids[i] for i in picked], seed=self.cfg.seed + 31 * step,
                                          min_version=weight_version, n=2 * self.f.k)
        distinct: dict[int, list[str]] = {}
        for s in samples:
            texts = distinct.setdefault(s.prompt_index, [])
            text = self.tokenizer.decode(s.response_ids, skip_special_tokens=True)
            if text not in texts and len(texts) < self.f.k:
                texts.append(text)
        rows = [(self.prompts[picked[i]], texts) for i, texts in sorted(distinct.items()) if len(texts) >= 2]
        self.counts["skipped_prompts"] += len(picked) - len(rows)
        if rows:
            ray.get(self.service.add_tasks.remote(rows, weight_version), timeout=self.cfg.cluster.call_timeout_s)
        self.counts["rounds"] += 1

    def new_labels(self) -> int:
        # comparison ids are 1, 2, 3... (SQLite AUTOINCREMENT, nothing is deleted): id = count
        return ray.get(self.service.progress.remote(), timeout=60)["comparisons"] - self.trained_through

    def wait_for_labels(self) -> None:
        """Block until every open task is labeled or ``min_labels`` new comparisons are in."""
        deadline = time.monotonic() + self.f.wait_timeout_s
        while ray.get(self.service.progress.remote(), timeout=60)["open"] and self.new_labels() < self.f.min_labels:
            if time.monotonic() > deadline:
                self.counts["wait_timeouts"] += 1
                log.warning("feedback.wait: fewer than %d new labels after %.0fs; training goes on",
                            self.f.min_labels, self.f.wait_timeout_s)
                return
            time.sleep(0.5)

    # ------------------------------------------------------------------ reward model
    def retrain(self) -> dict[str, float]:
        """Warm-start training on the comparisons so far (new ones plus a replay of older ones,
        :meth:`replay_mix`); swap in if held-out accuracy holds."""
        from rlhf_ray.reward_model import summarize
        from rlhf_ray.workers.supervised import encode_rankings

        comparisons = ray.get(self.service.comparisons.remote(0), timeout=self.cfg.cluster.call_timeout_s)
        held = [c for c in comparisons if c.id % self.f.heldout_every == 0]  # whole rankings: no pair leaks
        train = [c for c in comparisons if c.id % self.f.heldout_every]
        lc = self.f.learner
        rows_per_step = lc.num_ranks * lc.micro_batch_size

        train_pairs, held_pairs = self.replay_mix(train), as_pairs(held)
        if len(train_pairs[0]) < rows_per_step or len(held_pairs[0]) < lc.num_ranks:
            return {}  # not enough yet: try again when more have arrived
        train_batch, held_batch = (encode_rankings(self.tokenizer, prompts, pairs, MAX_RM_LEN, "feedback comparisons")
                                   for prompts, pairs in (train_pairs, held_pairs))
        before = summarize(self.rm.evaluate(held_batch))["eval/accuracy"]
        self.rm.save_checkpoint(str(self.dir / "deployed"))
        steps = len(train_batch) // rows_per_step
        metrics: dict[str, float] = {}
        for epoch in range(self.f.rm_epochs):
            order = torch.randperm(len(train_batch), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            metrics = self.rm.train(train_batch.select(order[: steps * rows_per_step]), steps)
        after = summarize(self.rm.evaluate(held_batch))["eval/accuracy"]
        self.trained_through = comparisons[-1].id
        accepted = after >= before + self.f.min_accuracy_gain
        if accepted:
            self.version += 1
            self.deployed_through = self.trained_through
            path = self.dir / f"reward_model_v{self.version}"
            self.rm.save_hf(str(path))
            self.tokenizer.save_pretrained(str(path))
            self.swap(str(path), self.version)
            self.heldout_accuracy = after
        else:
            self.rm.load_checkpoint(str(self.dir / "deployed"))
            self.counts["rejected_versions"] += 1
            self.heldout_accuracy = before
        log.info("reward model retrained on %d rankings (%d held out): accuracy %.3f -> %.3f, %s", len(train),
                 len(held), before, after, f"now version {self.version}" if accepted else "kept the current version")
        return {"reward_model/candidate_accuracy": after, "reward_model/loss": metrics.get("reward_model/loss", math.nan),
                "reward_model/train_comparisons": float(len(train)), "reward_model/train_pairs": float(len(train_batch))}

    def replay_mix(self, train: list) -> tuple[list[str], list[list[str]]]:
        """The pairs of the comparisons the deployed version has not learned from, plus ``replay``
        times as many pairs drawn afresh from the older ones. Warm-started training that passed
        over every old comparison again at each retraining would fit them a few more epochs each
        time: in the demo every candidate after the fifth version was worse on held-out pairs
        than the deployed one (and rejected), so the reward model froze while the policy moved."""
        new_prompts, new_pairs = as_pairs([c for c in train if c.id > self.deployed_through])
        old_prompts, old_pairs = as_pairs([c for c in train if c.id <= self.deployed_through])
        n = min(len(old_pairs), round(self.f.replay * len(new_pairs)))
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.trained_through)
        picked = torch.randperm(len(old_pairs), generator=gen)[:n].tolist()
        return new_prompts + [old_prompts[i] for i in picked], new_pairs + [old_pairs[i] for i in picked]

    def swap(self, path: str, version: int) -> None:
        """Every reward worker loads version ``version`` in place."""
        self.version_path = path
        workers = self.g.reward.workers
        self.g.reward.get([w.load_reward_model.remote(path, version) for w in workers], "load_reward_model")

    def metrics(self) -> dict[str, float]:
        workers = self.g.reward.workers
        versions = self.g.reward.get([w.reward_model_version.remote() for w in workers], "reward_model_version")
        if self.version and any(v != self.version for v in versions):  # a restarted worker starts at version 0
            self.counts["worker_reloads"] += 1
            self.swap(self.version_path, self.version)
            versions = [self.version] * len(workers)
        p = ray.get(self.service.progress.remote(), timeout=60)
        labeler = self.labeler.counts if self.labeler else {}
        return {"reward/model_version": float(min(versions)), "reward_model/heldout_accuracy": self.heldout_accuracy,
                "feedback/labels": float(p["comparisons"]), "feedback/tasks_open": float(p["open"]),
                "feedback/labeler_timeouts": float(labeler.get("timeouts", 0)),
                "feedback/labeler_errors": float(labeler.get("errors", 0)),
                **{f"feedback/{k}": float(v) for k, v in self.counts.items()}}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"version": self.version, "trained_through": self.trained_through,
                "deployed_through": self.deployed_through,
                "heldout_accuracy": None if math.isnan(self.heldout_accuracy) else self.heldout_accuracy,
                "counts": dict(self.counts)}

    def save(self, path: Path) -> None:
        """Into a trainer checkpoint: the labels (a consistent copy of the database), the reward
        model group's DeepSpeed state and the deployed version's weights."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        src, dst = sqlite3.connect(str(self.db_path)), sqlite3.connect(str(path / "labels.db"))
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        if self.rm is not None:
            self.rm.save_checkpoint(str(path / "reward_model"))
        else:
            shutil.copytree(self.dir / "last", path / "reward_model", dirs_exist_ok=True)
        if self.version:
            shutil.copytree(self.version_path, path / "deployed", dirs_exist_ok=True)

    def load(self, path: Path, state: dict) -> None:
        """Resume: labels (the live database wins if it exists: it may hold newer labels), the
        deployed version back in the reward workers, the group's weights and optimizer."""
        path = Path(path)
        if not self.db_path.exists():
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path / "labels.db", self.db_path)
        self.start()
        self.version, self.trained_through = state["version"], state["trained_through"]
        self.deployed_through = state.get("deployed_through", self.trained_through)  # older checkpoints: all learned
        self.heldout_accuracy = math.nan if state["heldout_accuracy"] is None else state["heldout_accuracy"]
        self.counts.update(state["counts"])
        self.rm.load_checkpoint(str(path / "reward_model"))
        if self.version:
            deployed = self.dir / f"reward_model_v{self.version}"
            if not deployed.exists():
                shutil.copytree(path / "deployed", deployed)
            self.swap(str(deployed), self.version)
