"""``python -m rlhf_ray.train``: the Hydra entry point of RL training.

Resolves and validates the config before any worker starts, joins (or starts) the Ray
cluster, builds the worker groups of the resource plan and runs ``Trainer.fit()``.
``--cfg job`` prints the resolved config; ``dry_run=true`` prints the resource plan and checks
it against the cluster without starting workers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rlhf_ray.config import Config, redacted, register_configs, validate
from rlhf_ray.runtime import reports_user_errors, run_dir

log = logging.getLogger("rlhf_ray")
register_configs()


def to_config(dcfg: DictConfig) -> Config:
    """The typed, validated config (every error reported at once, by dotted key)."""
    cfg = OmegaConf.to_object(dcfg)
    return validate(cfg)


def compose_config(overrides: list[str]) -> Config:
    """The validated config that ``python -m rlhf_ray.train OVERRIDES`` would run (for code
    that drives training without the CLI: tests, benchmarks, notebooks)."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


def check_assets(cfg: Config, assets):
    """Before any worker starts: every model path holds a model, and the policy's tokenizer
    fits every model it will feed (errors name the config key and the path)."""
    from transformers import AutoConfig

    from rlhf_ray.models import check_model_dir, check_tokenizer_matches_model, load_tokenizer

    roles = {"model.policy_path": assets.policy_path, "model.reference_path": assets.reference_path}
    if cfg.algo.needs_critic:
        roles["model.critic_path"] = assets.critic_path
    for key, path in roles.items():
        check_model_dir(path, key, tokenizer=key == "model.policy_path")
    if cfg.reward.kind == "model":
        check_model_dir(cfg.reward.model_path, "reward.model_path")
    tokenizer = load_tokenizer(assets.policy_path, trust_remote_code=cfg.model.trust_remote_code)
    for key, path in roles.items():
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        check_tokenizer_matches_model(tokenizer, model_config, where=key.split(".")[1].removesuffix("_path"))
    return tokenizer


def run(cfg: Config, run_dir: Path) -> dict:
    import ray

    from rlhf_ray.data import DataError, load_prompt_dataset, tokenize_prompts_with_index
    from rlhf_ray.placement import format_plan, resource_plan
    from rlhf_ray.runtime import connect, resolve_assets

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(redacted(asdict(cfg)), indent=2) + "\n")
    plan = resource_plan(cfg)
    assets = resolve_assets(cfg)
    tokenizer = check_assets(cfg, assets)
    prompts = list(load_prompt_dataset(assets.train_prompts, prompt_key=cfg.data.prompt_key)["prompt"])
    eval_prompts = list(load_prompt_dataset(assets.eval_prompts, prompt_key=cfg.data.prompt_key)["prompt"])
    prompt_ids, kept = tokenize_prompts_with_index(tokenizer, prompts, cfg.data.max_prompt_len,
                                                   cfg.data.overlong_prompt)
    if not prompt_ids:
        raise DataError(f"{assets.train_prompts}: no prompts left after data.overlong_prompt="
                        f"{cfg.data.overlong_prompt} (data.max_prompt_len={cfg.data.max_prompt_len})")
    if len(kept) < len(prompts):
        log.warning("%d of %d prompts skipped as longer than data.max_prompt_len", len(prompts) - len(kept),
                    len(prompts))
    prompts = [prompts[i] for i in kept]
    started = connect(cfg.cluster, plan)
    log.info("resource plan:\n%s", format_plan(plan))
    try:
        summary = fit_with_restarts(cfg, assets, tokenizer, (prompts, prompt_ids), eval_prompts, run_dir)
    finally:
        if started:
            ray.shutdown()
    log.info("run finished: %s", run_dir)
    return summary


def fit_with_restarts(cfg: Config, assets, tokenizer, prompts: tuple[list[str], list[list[int]]],
                      eval_prompts: list[str], run_dir: Path) -> dict:
    """Build the groups and train. A worker failure that the trainer cannot repair in place (a
    dead learner rank, say) tears every group down and resumes from the last complete
    checkpoint, at most ``trainer.max_restarts`` times; then the error, naming the worker, stands."""
    from rlhf_ray.groups import WorkerError
    from rlhf_ray.runtime import build_groups
    from rlhf_ray.trainer import Trainer

    for attempt in range(cfg.trainer.max_restarts + 1):
        groups = build_groups(cfg, assets)
        try:
            return Trainer(cfg, groups, tokenizer, *prompts, run_dir, eval_prompts).fit()
        except WorkerError as e:
            if attempt == cfg.trainer.max_restarts or cfg.trainer.resume == "never":
                raise
            log.warning("worker failure: %s -- restarting all groups from the last checkpoint (%d/%d)",
                        e, attempt + 1, cfg.trainer.max_restarts)
        finally:
            groups.shutdown()
    raise AssertionError("unreachable")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@reports_user_errors
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = to_config(dcfg)
    if cfg.dry_run:
        from rlhf_ray.runtime import dry_run

        print(dry_run(cfg))
        print(f"run directory: {run_dir(cfg.trainer.output_dir)}")
        return
    run(cfg, run_dir(cfg.trainer.output_dir))


if __name__ == "__main__":
    main()
