"""The README's worked example (chat data + a local HF model + LoRA + ``ray job submit`` with
``s3://`` outputs): both of its commands, read from README.md, compose and validate as the entry
points would compose them (no model or data is read: those paths do not exist here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf_ray.stage import validate_supervised
from rlhf_ray.stage_config import register_configs
from rlhf_ray.train import compose_config

ROOT = Path(__file__).resolve().parents[1]


def commands() -> dict[str, list[str]]:
    """Each ``python -m MODULE ARGS`` of the worked example's bash block: module -> overrides."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("**Worked example**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    found = {}
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if "python" in words:
            i = words.index("python")
            assert words[i + 1] == "-m", line
            found[words[i + 2]] = words[i + 3 :]
    return found


def test_worked_example_commands_are_valid_configs():
    cmds = commands()
    assert set(cmds) == {"rlhf_ray.reward_model", "rlhf_ray.train"}
    rm_args, rl_args = cmds["rlhf_ray.reward_model"], cmds["rlhf_ray.train"]
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        rm = validate_supervised(OmegaConf.to_object(compose("reward_model", overrides=rm_args)))
    rl = compose_config(rl_args)  # validated: every bad key/value would raise ConfigError
    assert rl.model.lora.rank > 0 and rl.trainer.output_dir.startswith("s3://")
    assert rl.trainer.save_every and rl.trainer.total_steps >= rl.trainer.save_every  # checkpoints are written
    # the RL run reads the reward model where the reward-model stage writes it (<output_dir>/model)
    assert (rl.reward.kind, rl.reward.model_path) == ("model", f"{rm.output_dir}/model")
    assert rl.reward.gold_function == ""  # the built-in task's gold labeler fails on other prompts
    assert rm.model.policy_path == rl.model.policy_path
