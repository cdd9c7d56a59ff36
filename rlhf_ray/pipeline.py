"""``python -m rlhf_ray.pipeline`` (``make demo``): the InstructGPT recipe end to end.

1. SFT: the base model (the built-in tiny Llama by default) learns from noisy demonstrations;
2. reward model: starts from the SFT model, learns from ranked comparisons;
3. PPO: the SFT model is the initial policy and the reference, the reward model the reward
   (``reward.kind=model``; ``reward@ppo.reward=rule`` trains on the task's verifier instead);
   the gold labeler is logged beside it as ``reward/gold``;
4. evaluation: SFT vs PPO on held-out prompts (gold, reward model, KL to the SFT policy;
   sampled at the training temperature and greedy) and the PPO run's curves.

Every stage's config is derived from this one before anything starts (each stage's output is
the next one's input) and validated at once. One Ray cluster serves every stage. The outputs
land in ``<output_dir>/{sft,reward_model,ppo,eval}`` plus ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import hydra
import ray
from omegaconf import DictConfig, OmegaConf

from rlhf_ray.config import Config, ConfigError, config_errors, redacted
from rlhf_ray.runtime import reports_user_errors, run_dir
from rlhf_ray.stage_config import (
    EvalConfig,
    PipelineConfig,
    RewardModelConfig,
    SFTConfig,
    eval_config_errors,
    register_configs,
    supervised_config_errors,
)

log = logging.getLogger("rlhf_ray.pipeline")
register_configs()


@dataclass(frozen=True)
class Stages:
    """The four stages' configs, wired output -> input."""

    sft: SFTConfig
    reward_model: RewardModelConfig
    ppo: Config
    eval: EvalConfig

    @property
    def sft_model(self) -> str:
        return str(Path(self.sft.output_dir) / "model")

    @property
    def reward_model_dir(self) -> str:
        return str(Path(self.reward_model.output_dir) / "model")


def stage_configs(cfg: PipelineConfig, out: Path) -> Stages:
    """Derive every stage's config from the pipeline's (nothing is mutated)."""
    out = out.absolute()
    c = cfg.cluster
    sft = replace(cfg.sft, cluster=c, output_dir=str(out / "sft"))
    sft_model = str(out / "sft" / "model")
    rm_model = cfg.reward_model.model
    reward_model = replace(cfg.reward_model, cluster=c, output_dir=str(out / "reward_model"),
                           model=replace(rm_model, policy_path=rm_model.policy_path or sft_model))
    rm_dir = str(out / "reward_model" / "model")
    p = cfg.ppo
    reward = p.reward
    if reward.kind == "model" and not reward.model_path:
        reward = replace(reward, model_path=rm_dir)
    ppo = replace(
        p, cluster=c, reward=reward,
        model=replace(p.model, policy_path=sft_model),  # reference (and critic) default to the policy
        trainer=replace(p.trainer, output_dir=str(out / "ppo")),
    )
    e = cfg.eval
    evaluation = replace(
        e, cluster=c, output_dir=str(out / "eval"),
        policies=list(e.policies) or [sft_model, str(out / "ppo" / "final")],
        names=list(e.names) or ([] if e.policies else ["sft", "ppo"]),
        reference_path=e.reference_path or sft_model,
        reward_model_path=e.reward_model_path or rm_dir,
        gold_function=p.reward.gold_function or e.gold_function,
        prompts_file=e.prompts_file or p.data.eval_prompts, prompt_key=p.data.prompt_key,
        max_prompt_len=p.data.max_prompt_len, data_seed=p.data.seed, cache_dir=p.model.cache_dir,
        rollout=replace(e.rollout, temperature=p.rollout.temperature, top_p=p.rollout.top_p,
                        max_new_tokens=p.rollout.max_new_tokens),
        metrics_file=e.metrics_file or str(out / "ppo" / "metrics.jsonl"), dtype=p.model.dtype,
    )
    return Stages(sft, reward_model, ppo, evaluation)


def validate_stages(s: Stages) -> Stages:
    """Every problem of every stage, reported at once, before any worker starts."""
    errors = supervised_config_errors("sft", s.sft.epochs, s.sft.steps_per_call, s.sft.learner, s.sft.data)
    rm = s.reward_model
    errors += supervised_config_errors("reward_model", rm.epochs, rm.steps_per_call, rm.learner, rm.data)
    errors += [f"ppo.{e}" for e in config_errors(s.ppo)]
    errors += eval_config_errors("eval", s.eval)
    if errors:
        raise ConfigError(errors)
    return s


def stage_plans(s: Stages) -> list[list]:
    """The resource plan of each stage (the stages run one after the other on one cluster)."""
    from rlhf_ray.evaluate import engine_plan, logprob_plan, policy_names
    from rlhf_ray.placement import resource_plan
    from rlhf_ray.stage import supervised_plan

    n_models = len({*s.eval.policies, s.eval.reference_path or s.eval.policies[0]})
    return [[supervised_plan("sft", s.sft.learner, s.sft.cluster)],
            [supervised_plan("reward_model", s.reward_model.learner, s.reward_model.cluster)],
            resource_plan(s.ppo), engine_plan(s.eval, policy_names(s.eval)), logprob_plan(s.eval, n_models)]


def cpus_needed(s: Stages) -> float:
    """Logical CPUs of the largest stage."""
    from rlhf_ray.placement import plan_totals

    return max(plan_totals(p)["CPU"] for p in stage_plans(s))


def banner(i: int, title: str) -> None:
    print(f"\n=== [{i}/4] {title} ===", flush=True)


def run(cfg: PipelineConfig, out: Path) -> dict:
    """All four stages; returns (and writes to ``out/summary.json``) what each produced."""
    from rlhf_ray import evaluate, reward_model, sft, train
    from rlhf_ray.eval_report import print_table
    from rlhf_ray.runtime import connect

    stages = validate_stages(stage_configs(cfg, out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(redacted(asdict(cfg)), indent=2) + "\n")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    started = connect(cfg.cluster, *stage_plans(stages))
    try:
        banner(1, "SFT on demonstrations")
        t = time.perf_counter()
        sft_summary = sft.run(stages.sft, Path(stages.sft.output_dir))
        seconds["sft"] = time.perf_counter() - t
        banner(2, "reward model on ranked comparisons")
        t = time.perf_counter()
        rm_summary = reward_model.run(stages.reward_model, Path(stages.reward_model.output_dir))
        seconds["reward_model"] = time.perf_counter() - t
        banner(3, f"{stages.ppo.algo.name.upper()} against the {stages.ppo.reward.kind} reward")
        t = time.perf_counter()
        ppo_summary = train.run(stages.ppo, Path(stages.ppo.trainer.output_dir))
        seconds["ppo"] = time.perf_counter() - t
        banner(4, "evaluation on held-out prompts")
        t = time.perf_counter()
        report = evaluate.run(stages.eval, Path(stages.eval.output_dir), show=False)
        seconds["evaluate"] = time.perf_counter() - t
    finally:
        if started:
            ray.shutdown()
    seconds["total"] = time.perf_counter() - start
    summary = {
        "outputs": {"sft_model": stages.sft_model, "reward_model": stages.reward_model_dir,
                    "ppo_model": ppo_summary.get("final_model", ""), "ppo_metrics": stages.eval.metrics_file,
                    "eval": str(Path(stages.eval.output_dir) / "eval.json"), "curves": report.get("curves", "")},
        "sft": {k: v for k, v in sft_summary.items() if k.startswith("eval/")},
        "reward_model": {k: v for k, v in rm_summary.items() if k.startswith("eval/")},
        "ppo": {k: v for k, v in ppo_summary.items() if k.startswith("eval/") or k == "steps"},
        "eval": {name: {"sampled": r["sampled"], "greedy": r["greedy"]} for name, r in report["policies"].items()},
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print_report(summary, report, out)
    print_table(report["header"], report["rows"], report["title"])
    return summary


def print_report(summary: dict, report: dict, out: Path) -> None:
    width = max(len(k) for k in summary["outputs"])
    print(f"\npipeline finished in {summary['seconds']['total']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items() if k != "total") + ")")
    acc = summary["reward_model"].get("eval/accuracy")
    if acc is not None:
        print(f"reward model held-out pairwise accuracy: {acc:.3f} (chance 0.5)")
    print(f"outputs under {out}:")
    for k, v in summary["outputs"].items():
        print(f"  {k:<{width}}  {v}")
    print(f"  {'summary':<{width}}  {out / 'summary.json'}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
@reports_user_errors
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: PipelineConfig = OmegaConf.to_object(dcfg)
    run(cfg, run_dir(cfg.output_dir))


if __name__ == "__main__":
    main()
