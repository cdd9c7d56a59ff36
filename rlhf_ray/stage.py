"""What the offline stages share: SFT and reward-model training (a DeepSpeed group trained for
epochs over a fixed data set, :func:`train_supervised`) and evaluation (the built-in task's
files, JSON outputs). Joining Ray and choosing the run directory are ``rlhf_ray.runtime``'s, as
for RL training.

A stage module (``rlhf_ray.sft``, ``rlhf_ray.reward_model``) brings only what is its own: how its
rows are loaded and encoded, which worker class trains on them, and what its held-out metrics are.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import ray
import torch
from tqdm.auto import tqdm

from rlhf_ray.config import ClusterConfig, Config, ConfigError, LearnerConfig, ModelConfig, redacted
from rlhf_ray.groups import DeepSpeedGroup
from rlhf_ray.placement import RolePlan
from rlhf_ray.stage_config import supervised_config_errors


class SupervisedGroup(DeepSpeedGroup):
    """Ranks of a supervised stage: every rank gets an equal shard of each batch."""

    def train(self, batch, steps: int) -> dict[str, float]:
        shards = batch.split(len(self.workers))
        return self.mean_metrics([w.train.remote(s, steps) for w, s in zip(self.workers, shards, strict=True)], "train")

    def evaluate(self, batch) -> dict[str, float]:
        """Summed counts of every rank (rows beyond a multiple of the rank count are left out,
        so that ZeRO-3 ranks run the same number of forwards)."""
        n = len(batch) - len(batch) % len(self.workers)
        shards = batch.select(slice(0, n)).split(len(self.workers))
        results = self.get([w.evaluate.remote(s) for w, s in zip(self.workers, shards, strict=True)], "evaluate")
        return {k: sum(r[k] for r in results) for k in results[0]}


def worker_env(cluster: ClusterConfig, overlapping: bool = True) -> dict[str, str]:
    from rlhf_ray.runtime import worker_env as env_of

    return env_of(Config(cluster=cluster), overlapping)


def supervised_plan(role: str, cfg: LearnerConfig, cluster: ClusterConfig) -> RolePlan:
    """The resources of a supervised stage: one bundle per rank."""
    return RolePlan(role, cfg.num_ranks, cluster.cpus_per_worker, 1 if cluster.device == "cuda" else 0,
                    cluster.placement_strategy)


def start_group(role: str, worker_cls: type, cfg: LearnerConfig, cluster: ClusterConfig, model_path: str, *,
                dtype: str, seed: int, total_optimizer_steps: int, trust_remote_code: bool,
                overlapping: bool = True) -> SupervisedGroup:
    """Spawn the ranks of a supervised stage and wire their DeepSpeed world. ``overlapping``:
    other workers compute on the same cores meanwhile (the feedback loop's reward model beside
    an RL run), not so for a stage of its own (``runtime.omp_wait_env``)."""
    env = worker_env(cluster, overlapping)
    group = SupervisedGroup(supervised_plan(role, cfg, cluster), worker_cls, lambda i, name: dict(
        name=name, rank=i, world_size=cfg.num_ranks, cfg=cfg, model_path=model_path, device=cluster.device,
        dtype=dtype, seed=seed, threads=cluster.threads_per_worker, gradient_accumulation_steps=1,
        total_optimizer_steps=total_optimizer_steps, trust_remote_code=trust_remote_code,
    ), namespace=cluster.namespace, timeout_s=cluster.call_timeout_s, env=env)
    try:
        group.start()  # placed, constructed, DeepSpeed world wired
    except BaseException:
        group.shutdown()
        raise
    return group


def steps_per_epoch(rows: int, learner: LearnerConfig) -> int:
    return rows // (learner.num_ranks * learner.micro_batch_size)


def fit_supervised(group: SupervisedGroup, train, held_out, *, epochs: int, steps_per_call: int,
                   learner: LearnerConfig, seed: int, run_dir: Path, desc: str,
                   summarize: Callable[[dict[str, float]], dict[str, float]]) -> list[dict]:
    """``epochs`` shuffled passes over ``train`` in calls of ``steps_per_call`` optimizer steps,
    each epoch followed by ``summarize(group.evaluate(held_out))``. Every call's metrics and every
    evaluation go to ``run_dir/metrics.jsonl``; returns the evaluations."""
    rows_per_step = learner.num_ranks * learner.micro_batch_size
    per_epoch = steps_per_epoch(len(train), learner)
    if per_epoch < 1:
        raise ValueError(f"{len(train)} training rows do not fill one step of {rows_per_step} rows "
                         "(learner.num_ranks x learner.micro_batch_size)")
    evaluations, step = [], 0
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as out, \
            tqdm(total=epochs * per_epoch, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for first in range(0, per_epoch, steps_per_call):
                steps = min(steps_per_call, per_epoch - first)
                rows = order[first * rows_per_step : (first + steps) * rows_per_step]
                metrics = group.train(train.select(rows), steps)
                step += steps
                out.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
                bar.update(steps)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items()
                                 if k.endswith(("loss", "accuracy"))})
            evaluation = {"step": step, "epoch": epoch, **summarize(group.evaluate(held_out))}
            out.write(json.dumps(evaluation) + "\n")
            out.flush()
            bar.write(f"{desc} epoch {epoch}/{epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in evaluation.items() if k.startswith("eval/")))
            evaluations.append(evaluation)
    return evaluations


def base_model_path(model: ModelConfig, seed: int) -> str:
    """``model.policy_path``, or the built-in tiny Llama (built on first use, as PPO does)."""
    from rlhf_ray.runtime import resolve_assets

    return resolve_assets(Config(seed=seed, model=model)).policy_path


def task_file(data_seed: int, cache_dir: str, name: str) -> str:
    """A file of the built-in task's data (generated on first use)."""
    from rlhf_ray.data import ensure_task_data
    from rlhf_ray.data.generate import task_data_dir

    return str(ensure_task_data(task_data_dir(Path(cache_dir).absolute(), data_seed), seed=data_seed)[name])


def save_tokenizer(model_path: str, out: Path, trust_remote_code: bool) -> None:
    from rlhf_ray.models import load_tokenizer

    load_tokenizer(model_path, trust_remote_code=trust_remote_code).save_pretrained(str(out))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def validate_supervised(cfg):
    """Raise ``ConfigError`` with every problem of a supervised stage's config (SFT or reward model)."""
    errors = supervised_config_errors("", cfg.epochs, cfg.steps_per_call, cfg.learner, cfg.data)
    if errors:
        raise ConfigError(errors)
    return cfg



def train_supervised(cfg, run_dir: Path, *, role: str, worker_cls: type,
                     load: Callable[[object, object], tuple], summarize: Callable[[dict[str, float]], dict[str, float]],
                     desc: str) -> dict:
    """Run one supervised stage (``cfg``: an SFTConfig or a RewardModelConfig) into ``run_dir``:
    ``load(cfg, tokenizer) -> (train, held_out)`` batches, a group of ``worker_cls`` ranks,
    held-out metrics before training and after every epoch, and the trained model saved with the
    tokenizer at ``run_dir/model``. Returns the summary (also ``run_dir/summary.json``)."""
    from rlhf_ray.models import check_model_dir, load_tokenizer
    from rlhf_ray.runtime import connect

    validate_supervised(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", redacted(asdict(cfg)))
    base = base_model_path(cfg.model, cfg.seed)
    check_model_dir(base, "model.policy_path", tokenizer=True)
    tokenizer = load_tokenizer(base, trust_remote_code=cfg.model.trust_remote_code)
    train, held_out = load(cfg, tokenizer)
    random.seed(cfg.seed)
    started = connect(cfg.cluster, [supervised_plan(role, cfg.learner, cfg.cluster)])
    start = time.perf_counter()
    group = start_group(role, worker_cls, cfg.learner, cfg.cluster, base, dtype=cfg.model.dtype, seed=cfg.seed,
                        total_optimizer_steps=cfg.epochs * steps_per_epoch(len(train), cfg.learner),
                        trust_remote_code=cfg.model.trust_remote_code,
                        overlapping=False)  # the stage's ranks compute on disjoint shares of the cores
    try:
        before = summarize(group.evaluate(held_out))
        evaluations = fit_supervised(group, train, held_out, epochs=cfg.epochs, steps_per_call=cfg.steps_per_call,
                                     learner=cfg.learner, seed=cfg.seed, run_dir=run_dir, desc=desc,
                                     summarize=summarize)
        model_dir = run_dir / "model"
        group.save_hf(str(model_dir))
        save_tokenizer(base, model_dir, cfg.model.trust_remote_code)
    finally:
        group.shutdown()
        if started:
            ray.shutdown()
    summary = {"model": str(model_dir), "base_model": base, "train_rows": len(train), "eval_rows": len(held_out),
               "seconds": time.perf_counter() - start, **{f"{k}_before": v for k, v in before.items()},
               **evaluations[-1]}
    write_json(run_dir / "summary.json", summary)
    return summary
