"""``python -m rlhf_ray.sft``: supervised fine-tuning (step 1 of InstructGPT).

A causal LM learns from demonstrations ``(prompt, response)``: cross-entropy on the response
tokens (EOS included) only, on a DeepSpeed ZeRO group of ``learner.num_ranks`` Ray workers.
Before training and after each epoch the held-out loss is measured. The result is a Hugging Face
model directory (safetensors + tokenizer) at ``<output_dir>/model`` that vLLM, the trainer and
the reward-model stage load as they are. The stage loop is :func:`rlhf_ray.stage.train_supervised`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_ray.runtime import reports_user_errors, run_dir
from rlhf_ray.stage import task_file, train_supervised, validate_supervised
from rlhf_ray.stage_config import SFTConfig, register_configs

log = logging.getLogger("rlhf_ray.sft")
register_configs()


def load_demonstrations(cfg: SFTConfig, tokenizer):
    """``(train, held_out)`` DemonstrationBatches from the configured (or built-in) files."""
    from rlhf_ray.data import load_sft_dataset
    from rlhf_ray.workers.supervised import encode_demonstrations

    d = cfg.data
    batches = []
    for path, limit, name in ((d.train_file, d.max_train_rows, "sft_train"), (d.eval_file, d.max_eval_rows, "sft_eval")):
        path = path or task_file(d.seed, cfg.model.cache_dir, name)
        rows = load_sft_dataset(path, prompt_key=cfg.prompt_key, response_key=cfg.response_key)
        if limit:
            rows = rows.select(range(min(limit, len(rows))))
        batches.append(encode_demonstrations(tokenizer, rows["prompt"], rows["response"], d.max_len, path))
    return tuple(batches)


def summarize(s: dict[str, float]) -> dict[str, float]:
    """Held-out metrics from the ranks' summed counts: per-token loss and perplexity."""
    nll = s["nll_sum"] / max(s["tokens"], 1.0)
    return {"eval/loss": nll, "eval/perplexity": float(torch.tensor(nll).exp()), "eval/tokens": s["tokens"]}


def run(cfg: SFTConfig, run_dir: Path) -> dict:
    """Train and save; returns the summary (also written to ``run_dir/summary.json``)."""
    from rlhf_ray.workers.supervised import SFTWorker

    summary = train_supervised(cfg, run_dir, role="sft", worker_cls=SFTWorker, load=load_demonstrations,
                               summarize=summarize, desc="sft")
    log.info("SFT model saved to %s (held-out loss %.4f -> %.4f)", summary["model"], summary["eval/loss_before"],
             summary["eval/loss"])
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="sft")
@reports_user_errors
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = validate_supervised(OmegaConf.to_object(dcfg))
    run(cfg, run_dir(cfg.output_dir))


if __name__ == "__main__":
    main()
