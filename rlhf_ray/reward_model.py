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
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rlhf_ray.runtime import reports_user_errors, run_dir
from rlhf_ray.stage import task_file, train_supervised, validate_supervised
from rlhf_ray.stage_config import RewardModelConfig, register_configs

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
    from rlhf_ray.workers.supervised import RewardModelWorker

    summary = train_supervised(cfg, run_dir, role="reward_model", worker_cls=RewardModelWorker, load=load_rankings,
                               summarize=summarize, desc="reward model")
    log.info("reward model saved to %s (held-out pairwise accuracy %.3f -> %.3f, chance 0.5)", summary["model"],
             summary["eval/accuracy_before"], summary["eval/accuracy"])
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="reward_model")
@reports_user_errors
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = validate_supervised(OmegaConf.to_object(dcfg))
    run(cfg, run_dir(cfg.output_dir))


if __name__ == "__main__":
    main()
