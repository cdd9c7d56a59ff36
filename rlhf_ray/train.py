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
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlhf_ray.config import Config, redacted, register_configs, validate

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


def run_dir_of(cfg: Config) -> Path:
    if cfg.trainer.output_dir:
        return Path(cfg.trainer.output_dir)
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path("outputs/run")


def run(cfg: Config, run_dir: Path) -> dict:
    import ray

    from rlhf_ray.data import load_prompt_dataset
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.placement import format_plan, resource_plan
    from rlhf_ray.runtime import build_groups, connect, resolve_assets
    from rlhf_ray.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(redacted(asdict(cfg)), indent=2) + "\n")
    plan = resource_plan(cfg)
    assets = resolve_assets(cfg)
    tokenizer = load_tokenizer(assets.policy_path, trust_remote_code=cfg.model.trust_remote_code)
    prompts = list(load_prompt_dataset(assets.train_prompts, prompt_key=cfg.data.prompt_key)[cfg.data.prompt_key])
    eval_prompts = list(load_prompt_dataset(assets.eval_prompts, prompt_key=cfg.data.prompt_key)[cfg.data.prompt_key])
    started = connect(cfg, plan)
    log.info("resource plan:\n%s", format_plan(plan))
    groups = build_groups(cfg, assets)
    try:
        summary = Trainer(cfg, groups, tokenizer, prompts, run_dir, eval_prompts).fit()
    finally:
        groups.shutdown()
        if started:
            ray.shutdown()
    log.info("run finished: %s", run_dir)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = to_config(dcfg)
    if cfg.dry_run:
        from rlhf_ray.placement import format_plan, resource_plan

        print(format_plan(resource_plan(cfg)))
        return
    run(cfg, run_dir_of(cfg))


if __name__ == "__main__":
    main()
