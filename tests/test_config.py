"""Config: composition of every conf/ group, all-at-once validation with dotted keys, the
CLI's resolved-config print, and secrets kept out of dumps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf_ray.config import Config, ConfigError, config_hash, redacted, validate
from tests.conftest import compose


@pytest.mark.parametrize("algo", ["ppo", "a2c", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp"])
def test_every_algorithm_config_composes(algo):
    cfg = compose([f"algo={algo}"])
    assert cfg.algo.name == algo
    assert cfg.algo.needs_critic == (algo in ("ppo", "a2c"))


def test_algorithm_table_drives_the_resolved_settings():
    assert compose(["algo=dr_grpo"]).algo.agg_mode == "seq_mean_token_sum_norm"
    assert compose(["algo=dr_grpo"]).algo.std_normalized is False
    assert compose(["algo=grpo"]).algo.std_normalized is True
    assert compose(["algo=grpo", "algo.normalize_std=false"]).algo.std_normalized is False
    assert compose(["algo=grpo", "algo.loss_agg=token_mean"]).algo.agg_mode == "token_mean"
    assert compose(["algo=a2c"]).algo.schedule == (1, 1)
    assert compose(["algo=ppo"]).algo.schedule == (2, 2)


def test_wrong_algorithm_combinations_are_rejected_naming_the_keys():
    with pytest.raises(ConfigError, match="algo.kl_estimator"):  # k1 as a loss: zero expected gradient
        compose(["algo=grpo", "algo.kl_estimator=k1"])
    compose(["algo=grpo", "algo.kl_estimator=k3"])
    compose(["algo=ppo", "algo.kl_estimator=k1"])  # k1 in the reward is fine
    with pytest.raises(ConfigError, match="algo.epochs/algo.minibatches"):  # A2C has no ratio
        compose(["algo=a2c", "algo.epochs=2"])
    with pytest.raises(ConfigError, match="algo.normalize_std"):
        compose(["algo=ppo", "algo.normalize_std=false"])
    with pytest.raises(ConfigError, match="algo.off_policy_correction"):
        compose(["algo.off_policy_correction=always"])
    with pytest.raises(ConfigError, match="trainer.max_staleness"):
        compose(["trainer.max_staleness=-1"])
    with pytest.raises(ConfigError, match="policy.max_tokens_per_micro_batch"):
        compose(["policy.max_tokens_per_micro_batch=10"])  # shorter than one sequence
    compose(["policy.max_tokens_per_micro_batch=200", "policy.micro_batch_size=5"])


def test_defaults_are_valid():
    validate(Config())


def test_all_errors_reported_at_once_with_dotted_keys():
    with pytest.raises(ConfigError) as e:
        compose(["algo.name=bogus", "rollout.temperature=0", "policy.num_ranks=3", "reward.kind=model",
                 "sync.backend=carrier_pigeon"])
    msg = str(e.value)
    for key in ("algo.name", "rollout.temperature", "policy.num_ranks", "reward.model_path", "sync.backend"):
        assert key in msg, (key, msg)
    assert len(e.value.errors) == 5


def test_micro_batch_must_split_each_ranks_share():
    # 16 prompts x 4 samples = 64 sequences; 2 ranks -> 32 each; 2 minibatches of 16; 16 % 5 != 0
    with pytest.raises(ConfigError, match="policy.micro_batch_size"):
        compose(["policy.max_tokens_per_micro_batch=0", "policy.micro_batch_size=5"])
    compose(["policy.micro_batch_size=5"])  # under the default token budget rows per micro-batch do not matter


def test_group_algorithms_need_several_samples():
    with pytest.raises(ConfigError, match="rollout.n_samples_per_prompt"):
        compose(["algo=grpo", "rollout.n_samples_per_prompt=1", "trainer.prompts_per_step=64"])


def test_http_reward_must_be_https_or_loopback():
    with pytest.raises(ConfigError, match="reward.url"):
        compose(["reward=http", "reward.url=http://rewards.example.com/score"])
    compose(["reward=http", "reward.url=http://127.0.0.1:8000/score"])
    compose(["reward=http", "reward.url=https://rewards.example.com/score"])
    with pytest.raises(ConfigError, match="reward.max_concurrency") as e:
        compose(["reward=http", "reward.url=http://127.0.0.1:8000/score", "reward.batch_size=0",
                 "reward.max_concurrency=0"])
    assert "reward.batch_size" in str(e.value)


def test_unknown_key_is_rejected_by_hydra():
    with pytest.raises(Exception, match="tempreature"):
        compose(["rollout.tempreature=0.5"])


def test_secrets_are_redacted_and_hash_ignores_trainer():
    d = {"reward": {"token": "s3cret", "token_env": "MY_TOKEN", "url": "u"}}
    assert redacted(d) == {"reward": {"token": "***", "token_env": "MY_TOKEN", "url": "u"}}
    a, b = Config(), Config()
    b.trainer.total_steps = 999
    assert config_hash(a) == config_hash(b)
    b.algo.clip_eps = 0.3
    assert config_hash(a) != config_hash(b)


def test_cli_prints_resolved_config():
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.train", "--cfg", "job", "algo=grpo"],
                         capture_output=True, text=True, check=True).stdout
    assert "name: grpo" in out and "kl_in_reward: false" in out


def test_cli_reports_bad_config_before_starting_anything():
    r = subprocess.run([sys.executable, "-m", "rlhf_ray.train", "rollout.top_p=2", "algo.epochs=0"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "rollout.top_p" in r.stderr and "algo.epochs" in r.stderr
