"""``python -m rlhf_ray.reward_model``: reward-model training (step 2 of InstructGPT).

A causal LM (the SFT model, in the pipeline) gets a scalar head
(``AutoModelForSequenceClassification``, ``num_labels=1``) and learns from rankings of K
completions per prompt with the all-pairs ranking loss (Ouyang et al. 2022, eq. 1), on a
DeepSpeed ZeRO group. After each epoch the held-out pairwise accuracy (fraction of ranked pairs
the model orders correctly; chance = 0.5) is measured. The result is a Hugging Face
sequence-classification directory (safetensors + tokenizer) at ``<output_dir>/model``, what
``reward.kind=model reward.model_path=DIR`` loads for RL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from rlhf_ray.config import (
    RewardModelConfig,
    redacted,
    register_configs,
)
from rlhf_ray.sft import (
    base_model_path,
    ensure_ray,
    fit_supervised,
    output_dir,
    save_tokenizer,
    start_group,
    steps_per_epoch,
    task_file,
    validate_supervised,
    write_json,
)

log = logging.getLogger("rlhf_ray.reward_model")
register_configs()


def load_rankings(cfg: RewardModelConfig, tokenizer):
    """``(train, held_out)`` RankingBatches from the configured (or built-in) comparison files."""
    from rlhf_ray.data import load_comparison_dataset
    from rlhf_ray.workers.supervised import encode_rankings

    d = cfg.data
    batches = []
    for path, limit, name in ((d.train_file, d.max_train_rows, "comparisons_train"),
                              (d.eval_file, d.max_eval_rows, "comparisons_eval")):
        path = path or task_file(d.seed, cfg.model.cache_dir, name)
        rows = load_comparison_dataset(path)
        if limit:
            rows = rows.select(range(min(limit, len(rows))))
        batches.append(encode_rankings(tokenizer, rows["prompt"], rows["completions"], d.max_len, path))
    return tuple(batches)


def summarize(s: dict[str, float]) -> dict[str, float]:
    """Held-out metrics from the ranks' summed counts."""
    pairs = max(s["pairs"], 1.0)
    return {"eval/accuracy": s["correct_pairs"] / pairs, "eval/loss": s["loss_sum"] / pairs,
            "eval/pairs": s["pairs"]}


def run(cfg: RewardModelConfig, run_dir: Path) -> dict:
    """Train and save; returns the summary (also written to ``run_dir/summary.json``)."""
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.workers.supervised import RewardModelWorker

    validate_supervised(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", redacted(asdict(cfg)))
    base = base_model_path(cfg.model, cfg.seed)
    tokenizer = load_tokenizer(base, trust_remote_code=cfg.model.trust_remote_code)
    train, held_out = load_rankings(cfg, tokenizer)
    started = ensure_ray(cfg.cluster, cfg.learner.num_ranks * cfg.cluster.cpus_per_worker)
    start = time.perf_counter()
    group = start_group("reward_model", RewardModelWorker, cfg.learner, cfg.cluster, base, dtype=cfg.model.dtype,
                        seed=cfg.seed, total_optimizer_steps=cfg.epochs * steps_per_epoch(len(train), cfg.learner),
                        trust_remote_code=cfg.model.trust_remote_code)
    try:
        initial = summarize(group.evaluate(held_out))
        evaluations = fit_supervised(group, train, held_out, epochs=cfg.epochs, steps_per_call=cfg.steps_per_call,
                                     learner=cfg.learner, seed=cfg.seed, run_dir=run_dir, desc="reward model",
                                     summarize=summarize)
        model_dir = run_dir / "model"
        group.save_hf(str(model_dir))
        save_tokenizer(base, model_dir, cfg.model.trust_remote_code)
    finally:
        group.shutdown()
        if started:
            ray.shutdown()
    summary = {"model": str(model_dir), "base_model": base, "train_rows": len(train), "eval_rows": len(held_out),
               "completions_per_row": int(train.input_ids.shape[1]), "eval/accuracy_before": initial["eval/accuracy"],
               "seconds": time.perf_counter() - start, **evaluations[-1]}
    write_json(run_dir / "summary.json", summary)
    log.info("reward model saved to %s (held-out pairwise accuracy %.3f, chance 0.5)", model_dir,
             summary["eval/accuracy"])
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="reward_model")
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = validate_supervised(OmegaConf.to_object(dcfg))
    run(cfg, output_dir(cfg.output_dir))


if __name__ == "__main__":
    main()
