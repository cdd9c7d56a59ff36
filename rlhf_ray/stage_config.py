"""Structured configs of the offline stages of the InstructGPT recipe (SFT -> reward model ->
PPO -> evaluation, ``python -m rlhf_ray.pipeline``): each stage's schema and its checks. The PPO
stage is ``rlhf_ray.config.Config``; the sections shared with it are defined there."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from rlhf_ray import config as rl_config
from rlhf_ray.config import (
    ClusterConfig,
    Config,
    LearnerConfig,
    ModelConfig,
    RolloutConfig,
    check_learner,
    resolve_learner,
)
from rlhf_ray.topology import auto_workers


@dataclass
class SupervisedDataConfig:
    """Files of a supervised stage: SFT demonstrations or ranked comparisons."""

    train_file: str = ""
    """training rows (raw or chat): a .jsonl/.parquet file, a save_to_disk directory or
    hf:NAME?split=S&config=C; empty = the built-in task's (sft_train / comparisons_train)"""
    eval_file: str = ""
    """held-out rows (same sources); empty = the built-in task's (sft_eval / comparisons_eval)"""
    max_train_rows: int = 0
    """use only the first N training rows (0 = all)"""
    max_eval_rows: int = 0
    """use only the first N held-out rows (0 = all)"""
    max_len: int = 64
    """longest tokenized row (prompt + response + EOS); a longer row is an error naming it"""
    seed: int = 0
    """seed of the built-in task's data"""


# Micro-batches are rows per rank per step (one rank below 16 cores, rlhf_ray/topology.py): 32
# demonstrations / 16 rankings per optimizer step. The reward model runs one epoch at learning
# rate 6e-4: held-out accuracy 0.861 in 500 steps, against 0.828 for one epoch of 8 rankings at
# 3e-4 (1,000 steps) and 0.885 for two epochs of 16 at 3e-4 (twice the time); README, The
# InstructGPT recipe. ZeRO stage 0: a single rank has nothing to partition, and stage 2's
# gradient buffers cost time for nothing (2 cores, 250 steps: reward model 24 -> 20 s, SFT 21 ->
# 19 s). Set learner.zero_stage=2 (or 3) with several ranks and a big optimizer state.
def _sft_learner() -> LearnerConfig:
    return LearnerConfig(lr=1e-3, micro_batch_size=32, warmup_steps=20, lr_schedule="cosine", zero_stage=0)


def _reward_model_learner() -> LearnerConfig:
    return LearnerConfig(lr=6e-4, micro_batch_size=16, warmup_steps=20, lr_schedule="cosine", zero_stage=0)


@dataclass
class SFTConfig:
    """``python -m rlhf_ray.sft``: supervised fine-tuning of a causal LM on demonstrations."""

    seed: int = 0
    """seed of the workers and of the data order"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """model.policy_path = the base model (empty = build the tiny built-in Llama)"""
    data: SupervisedDataConfig = field(default_factory=SupervisedDataConfig)
    """demonstration files ({prompt, response} rows)"""
    prompt_key: str = "prompt"
    """column holding the prompt"""
    response_key: str = "response"
    """column holding the demonstrated response (EOS is appended as a token)"""
    epochs: int = 6
    """passes over the training rows (held-out loss after each)"""
    steps_per_call: int = 25
    """optimizer steps per call to the learner group (granularity of progress and metrics)"""
    learner: LearnerConfig = field(default_factory=_sft_learner)
    """DeepSpeed ranks, ZeRO stage, optimizer; micro_batch_size = rows per rank per step"""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray cluster and worker resources"""
    output_dir: str = ""
    """run directory (the model goes to <output_dir>/model); empty = Hydra's run directory"""

    def __post_init__(self) -> None:
        self.learner = resolve_learner(self.learner, auto_workers(self.cluster.device))


@dataclass
class RewardModelConfig:
    """``python -m rlhf_ray.reward_model``: a reward model trained on ranked comparisons."""

    seed: int = 0
    """seed of the workers and of the data order"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """model.policy_path = the causal LM the reward model starts from (empty = the tiny built-in)"""
    data: SupervisedDataConfig = field(default_factory=SupervisedDataConfig)
    """comparison files ({prompt, completions best -> worst} or {prompt, chosen, rejected} rows)"""
    epochs: int = 1
    """passes over the training rows (held-out pairwise accuracy after each)"""
    steps_per_call: int = 25
    """optimizer steps per call to the learner group (granularity of progress and metrics)"""
    learner: LearnerConfig = field(default_factory=_reward_model_learner)
    """DeepSpeed ranks, ZeRO stage, optimizer; micro_batch_size = comparison rows per rank per step"""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray cluster and worker resources"""
    output_dir: str = ""
    """run directory (the model goes to <output_dir>/model); empty = Hydra's run directory"""

    def __post_init__(self) -> None:
        self.learner = resolve_learner(self.learner, auto_workers(self.cluster.device))


def _eval_rollout() -> RolloutConfig:
    return RolloutConfig(num_engines=1)


@dataclass
class EvalConfig:
    """``python -m rlhf_ray.evaluate``: policies compared on held-out prompts, training curves plotted."""

    seed: int = 0
    """seed of sampling"""
    policies: list[str] = field(default_factory=list)
    """HF directories of the policies to compare (e.g. the SFT model and PPO's final)"""
    names: list[str] = field(default_factory=list)
    """a display name per policy; empty = the directory names"""
    reference_path: str = ""
    """policy the KL is measured to; empty = the first policy"""
    reward_model_path: str = ""
    """reward model scoring the completions as well; empty = gold score only"""
    gold_function: str = "rlhf_ray.data.task:gold_reward"
    """gold labeler 'module:callable(prompts, completions) -> list[float]'"""
    prompts_file: str = ""
    """held-out prompts ({prompt} rows); empty = the built-in task's prompts_eval"""
    prompt_key: str = "prompt"
    """column holding the prompt"""
    max_prompts: int = 0
    """use only the first N prompts (0 = all)"""
    max_prompt_len: int = 24
    """longest prompt in tokens (longer ones keep their end)"""
    data_seed: int = 0
    """seed of the built-in task's data"""
    cache_dir: str = ".cache/rlhf_ray"
    """where the built-in data is built"""
    rollout: RolloutConfig = field(default_factory=_eval_rollout)
    """sampling as in training: temperature, top_p, max_new_tokens, n_samples_per_prompt"""
    dtype: str = "float32"
    """weights dtype"""
    metrics_file: str = ""
    """a run's metrics.jsonl whose curves (proxy reward, gold, KL) are plotted; empty = no plot"""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray cluster and worker resources"""
    output_dir: str = ""
    """where eval.json and curves.png go; empty = Hydra's run directory"""


@dataclass
class PipelineConfig:
    """``python -m rlhf_ray.pipeline``: tiny model -> SFT -> reward model -> PPO -> evaluation."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """the one Ray cluster of every stage (replaces each stage's own cluster settings)"""
    output_dir: str = ""
    """run directory holding sft/, reward_model/, ppo/, eval/; empty = Hydra's run directory"""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """stage 1; its model.policy_path is the base model"""
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """stage 2; starts from the SFT model unless reward_model.model.policy_path is set"""
    ppo: Config = field(default_factory=Config)
    """stage 3; policy = reference = the SFT model, reward = the trained reward model"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """stage 4; compares the SFT and PPO policies, sampled at ppo.rollout's temperature and greedy"""


def supervised_config_errors(key: str, epochs: int, steps_per_call: int, learner: LearnerConfig,
                             data: SupervisedDataConfig) -> list[str]:
    """Problems of an SFT / reward-model config, one ``dotted.key: message`` each (``key`` = its prefix)."""
    key = f"{key}." if key else ""
    e = check_learner(f"{key}learner", learner, learner.num_ranks * learner.micro_batch_size, 1)
    if epochs < 1:
        e.append(f"{key}epochs: must be >= 1, got {epochs}")
    if steps_per_call < 1:
        e.append(f"{key}steps_per_call: must be >= 1, got {steps_per_call}")
    if data.max_len < 2:
        e.append(f"{key}data.max_len: must be >= 2, got {data.max_len}")
    for name in ("max_train_rows", "max_eval_rows"):
        if getattr(data, name) < 0:
            e.append(f"{key}data.{name}: must be >= 0, got {getattr(data, name)}")
    return e


def eval_config_errors(key: str, c: EvalConfig, need_policies: bool = True) -> list[str]:
    """Problems of an evaluation config, one ``dotted.key: message`` each (``key`` = its prefix)."""
    key = f"{key}." if key else ""
    e = []
    if need_policies and not c.policies:
        e.append(f"{key}policies: give at least one policy directory, e.g. '{key}policies=[DIR]'")
    if c.names and len(c.names) != len(c.policies):
        e.append(f"{key}names: {len(c.names)} names for {len(c.policies)} policies")
    if len(set(c.names)) != len(c.names):
        e.append(f"{key}names: names must be distinct, got {c.names}")
    if c.rollout.temperature <= 0:
        e.append(f"{key}rollout.temperature: must be > 0 (greedy decoding is always reported too)")
    if c.rollout.n_samples_per_prompt < 1 or c.rollout.max_new_tokens < 1:
        e.append(f"{key}rollout: n_samples_per_prompt and max_new_tokens must be >= 1")
    if c.gold_function and ":" not in c.gold_function:
        e.append(f"{key}gold_function: expected 'module:callable', got {c.gold_function!r}")
    return e


def register_configs() -> None:
    """The RL schema and the InstructGPT stages' schemas (conf/sft.yaml, reward_model.yaml,
    evaluate.yaml, pipeline.yaml)."""
    rl_config.register_configs()
    cs = ConfigStore.instance()
    cs.store(name="sft_config", node=SFTConfig)
    cs.store(name="reward_model_config", node=RewardModelConfig)
    cs.store(name="eval_config", node=EvalConfig)
    cs.store(name="pipeline_config", node=PipelineConfig)
