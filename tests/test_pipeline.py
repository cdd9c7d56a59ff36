"""The pipeline's wiring: conf/pipeline.yaml composes, each stage's output is the next one's
input, and every stage's config problems are reported at once before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf_ray.config import ConfigError
from rlhf_ray.pipeline import cpus_needed, stage_configs, validate_stages
from rlhf_ray.stage_config import PipelineConfig

CONF = str(Path(__file__).parents[1] / "conf")


def pipeline_config(overrides: list[str] = ()) -> PipelineConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_object(compose("pipeline", overrides=list(overrides)))


def test_stages_are_wired_output_to_input(tmp_path):
    s = validate_stages(stage_configs(pipeline_config(), tmp_path))
    sft_model, rm_model = str(tmp_path / "sft" / "model"), str(tmp_path / "reward_model" / "model")
    assert s.sft_model == sft_model and s.reward_model_dir == rm_model
    assert s.sft.model.policy_path == ""  # the built-in tiny model
    assert s.reward_model.model.policy_path == sft_model
    assert s.ppo.model.policy_path == sft_model and s.ppo.model.reference_path == ""  # reference = policy
    assert (s.ppo.reward.kind, s.ppo.reward.model_path) == ("model", rm_model)
    assert s.ppo.trainer.output_dir == str(tmp_path / "ppo")
    assert s.eval.policies == [sft_model, str(tmp_path / "ppo" / "final")] and s.eval.names == ["sft", "ppo"]
    assert (s.eval.reference_path, s.eval.reward_model_path) == (sft_model, rm_model)
    assert s.eval.rollout.temperature == s.ppo.rollout.temperature
    assert s.eval.metrics_file == str(tmp_path / "ppo" / "metrics.jsonl")
    assert s.sft.cluster == s.ppo.cluster == s.eval.cluster
    # the PPO stage's plan is the largest: engines + reward + reference + policy and critic ranks
    p = s.ppo
    assert cpus_needed(s) == p.rollout.num_engines + 2 + p.policy.num_ranks + p.critic.num_ranks


def test_rule_reward_is_one_choice_away(tmp_path):
    s = stage_configs(pipeline_config(["reward@ppo.reward=rule", "algo@ppo.algo=grpo"]), tmp_path)
    assert (s.ppo.reward.kind, s.ppo.algo.name) == ("function", "grpo")
    assert s.eval.reward_model_path.endswith("reward_model/model")  # still compared in evaluation


def test_every_stage_reports_its_problems_at_once(tmp_path):
    cfg = pipeline_config(["sft.epochs=0", "reward_model.learner.lr=0", "ppo.rollout.temperature=0",
                           "eval.rollout.n_samples_per_prompt=0"])
    with pytest.raises(ConfigError) as e:
        validate_stages(stage_configs(cfg, tmp_path))
    keys = {line.split(":")[0] for line in e.value.errors}
    assert {"sft.epochs", "reward_model.learner.lr", "ppo.rollout.temperature", "eval.rollout"} <= keys
