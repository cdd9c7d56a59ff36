"""Any Hugging Face causal LM: tiny random models of seven architectures (built from their
configs, with the built-in character tokenizer and its chat template) go through the real
stack one at a time: a vLLM engine loads the directory and samples from chat prompts (stopping
on the generation_config's several EOS ids, extra stop ids and stop strings), the ids it was
given and generated are exactly the learner's batch, a one-rank DeepSpeed learner takes a step,
the weights sync to the engine, and vLLM's logprobs equal the learner's (< 1e-4).

Every parameter is delivered: the learner's update moves every weight (AdamW, lr 1e-2), so any
tensor the engine did not receive would show up as a logprob difference far above 1e-4.
"""

from __future__ import annotations

import time

import pytest
import torch

from rlhf_ray.batch import pad_samples
from rlhf_ray.config import AlgoConfig, Config, LearnerConfig, RolloutConfig, SyncConfig
from rlhf_ray.data import tokenize_prompts_with_index
from rlhf_ray.groups import PolicyGroup, RolloutGroup
from rlhf_ray.models import build_char_tokenizer, build_tiny_model, load_causal_lm
from rlhf_ray.placement import RolePlan
from rlhf_ray.runtime import worker_env
from rlhf_ray.sampling import stop_token_ids
from rlhf_ray.sync.coordinator import WeightSync
from rlhf_ray.workers.policy import PolicyWorker
from rlhf_ray.workers.rollout import RolloutWorker
from tests.models.architectures import architecture_configs

pytestmark = pytest.mark.e2e

ARCHITECTURES = architecture_configs(
    vocab_size=104, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
    max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MAX_NEW = 8
TOK = build_char_tokenizer()
EOS_IDS = [TOK.eos_token_id] + [TOK.convert_tokens_to_ids(c) for c in "01234"]  # generation_config
ROLLOUT = RolloutConfig(num_engines=1, n_samples_per_prompt=4, max_new_tokens=MAX_NEW, temperature=1.0,
                        stop_token_ids=[TOK.convert_tokens_to_ids(c) for c in "VWXYZ"], stop=["e", "t"])
PROMPTS = [
    [{"role": "user", "content": "rev abc="}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev hello="}],
    # a second turn: the first answer's EOS token sits inside the prompt ids
    [{"role": "user", "content": "rev ab="}, {"role": "assistant", "content": "ba"}, {"role": "user", "content": "rev xy="}],
    [{"role": "user", "content": "hi"}],
]
stops_seen: dict[str, int] = {"generation_config": 0, "stop_token_ids": 0, "stop": 0, "length": 0}


def start_groups(model_dir: str, arch: str) -> tuple[RolloutGroup, PolicyGroup]:
    """Spawn (without waiting for them) one vLLM engine and a one-rank learner on ``model_dir``;
    worker names carry the architecture, so two architectures' workers can be alive at once."""
    env = worker_env(Config())
    rollout = RolloutGroup(RolePlan(f"rollout-{arch}", 1, 1.0, 0, "PACK"), RolloutWorker, lambda i, name: dict(
        name=name, model_path=model_dir, cfg=ROLLOUT, max_model_len=64, seed=0,
    ), namespace="rlhf_ray_tests", timeout_s=300,
        env=dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1"))
    learner = LearnerConfig(num_ranks=1, micro_batch_size=4, lr=1e-2, zero_stage=2)
    policy = PolicyGroup(RolePlan(f"policy-{arch}", 1, 1.0, 0, "PACK"), PolicyWorker, lambda i, name: dict(
        name=name, rank=i, world_size=1, cfg=learner, model_path=model_dir,
        algo=AlgoConfig(epochs=1, minibatches=1), gradient_accumulation_steps=4,
    ), namespace="rlhf_ray_tests", timeout_s=300, env=env)
    return rollout, policy


class Matrix:
    """The selected architectures' workers, spawned one architecture ahead: while one
    architecture's checks run, the next one's engine and learner are already starting (their
    process start-up, imports and engine build are mostly one core each, so two architectures
    in flight keep both cores busy). At most ``AHEAD + 1`` architectures are alive at once."""

    AHEAD = 1

    def __init__(self, archs: list[str], tmp_path_factory):
        self.archs, self.tmp = archs, tmp_path_factory
        self.alive: dict[str, tuple[str, RolloutGroup, PolicyGroup]] = {}

    def _spawn(self, arch: str) -> None:
        if arch not in self.alive:
            model_dir = str(build_tiny_model(self.tmp.mktemp(arch) / arch, ARCHITECTURES[arch](), TOK,
                                             eos_token_ids=EOS_IDS))
            self.alive[arch] = (model_dir, *start_groups(model_dir, arch))

    def take(self, arch: str) -> tuple[str, RolloutGroup, PolicyGroup]:
        """``arch``'s model directory and groups (spawned now if not yet), and spawn the next."""
        self._spawn(arch)
        i = self.archs.index(arch) if arch in self.archs else len(self.archs)
        for following in self.archs[i + 1 : i + 1 + self.AHEAD]:
            self._spawn(following)
        return self.alive[arch]

    def release(self, arch: str) -> None:
        _, rollout, policy = self.alive.pop(arch)
        rollout.shutdown()
        policy.shutdown()


@pytest.fixture(scope="module")
def matrix(ray_cluster, tmp_path_factory, request):
    """One ``Matrix`` for the module, over the architectures this session selected, in order."""
    archs = [item.callspec.params["arch"] for item in request.session.items
             if item.module is request.module and "arch" in getattr(getattr(item, "callspec", None), "params", {})]
    m = Matrix(archs, tmp_path_factory)
    yield m
    for arch in list(m.alive):
        m.release(arch)


def check_stops(sample, stop_ids: set[int]) -> None:
    ids = sample.response_ids
    texts = [TOK.decode([i]) for i in ids]
    for j, (i, text) in enumerate(zip(ids, texts, strict=True)):
        is_stop = i in stop_ids or text in ROLLOUT.stop
        assert not is_stop or j == len(ids) - 1, f"generation went on after stop token {text!r}: {texts}"
    last, text = ids[-1], texts[-1]
    if last in EOS_IDS:
        stops_seen["generation_config"] += 1
    elif last in ROLLOUT.stop_token_ids:
        stops_seen["stop_token_ids"] += 1
    elif text in ROLLOUT.stop:
        stops_seen["stop"] += 1
    else:
        assert len(ids) == MAX_NEW and sample.finish_reason == "length", (texts, sample.finish_reason)
        stops_seen["length"] += 1


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_loads_trains_and_syncs(matrix, arch):
    start = time.perf_counter()
    model_dir, rollout, policy = matrix.take(arch)
    try:
        rollout.ready()
        policy.start()
        sync = WeightSync(policy, rollout, SyncConfig(), tensor_parallel_size=1, timeout_s=300, pad_id=TOK.pad_token_id)
        # every parameter of the HF model is in the sync plan (tied weights once)
        hf_names = {n for n, _ in load_causal_lm(model_dir).named_parameters()}
        assert {m.name for bucket in sync.plan for m in bucket} == hf_names

        prompt_ids, _ = tokenize_prompts_with_index(TOK, PROMPTS, 32)
        samples = rollout.generate(prompt_ids, seed=1, min_version=0)
        assert len(samples) == len(PROMPTS) * ROLLOUT.n_samples_per_prompt
        stop_ids = set(stop_token_ids(ROLLOUT, model_dir))
        assert stop_ids == set(EOS_IDS) | set(ROLLOUT.stop_token_ids)
        for s in samples:
            check_stops(s, stop_ids)

        # token-in, token-out: each learner row is exactly [ids given to vLLM | ids vLLM generated]
        exp = pad_samples(samples, TOK.pad_token_id)
        for row, s in enumerate(samples):
            assert s.prompt_ids == prompt_ids[s.prompt_index]
            assert exp.sequences[row][exp.attention_mask[row].bool()].tolist() == s.prompt_ids + s.response_ids
        assert prompt_ids[2].count(TOK.eos_token_id) == 1  # a text round trip would have lost it

        exp.old_logprobs = policy.compute_logprobs(exp)
        mask = exp.response_mask
        behaviour = float(((exp.rollout_logprobs - exp.old_logprobs).abs() * mask).sum() / mask.sum())
        assert behaviour < 1e-4, f"{arch}: vLLM vs learner logprobs before any update differ by {behaviour:.2e}"

        g = torch.Generator().manual_seed(0)
        exp.valid = torch.ones(len(exp))
        exp.advantages = torch.randn(mask.shape, generator=g) * mask
        exp.ref_logprobs = exp.old_logprobs
        policy.update(exp, kl_coef=0.0)
        diff = sync.push(1, check=samples)["sync/check_logprob_diff"]  # vLLM vs learner on the new weights
        after = policy.compute_logprobs(exp)
        moved = float(((after - exp.old_logprobs).abs() * mask).sum() / mask.sum())
        print(f"\n{arch}: behaviour diff {behaviour:.1e}, update moved logprobs {moved:.1e}, "
              f"post-sync diff {diff:.1e}, {sync.weight_bytes / 1e6:.2f} MB, {time.perf_counter() - start:.1f}s")
        assert moved > 1e-2, "the update should change the policy for the check to mean anything"
        assert diff < 1e-4, f"{arch}: vLLM vs learner logprobs after sync differ by {diff:.2e}"
    finally:
        matrix.release(arch)


def test_every_kind_of_stop_happened():
    """Across the architectures, completions stopped on the generation_config's extra EOS ids and
    on rollout.stop_token_ids. (Stop strings are passed to vLLM, but with the character tokenizer
    none was seen to fire in these runs: not verified here.)"""
    if sum(stops_seen.values()) == 0:
        pytest.skip("the architecture tests did not run")
    assert all(stops_seen[k] > 0 for k in ("generation_config", "stop_token_ids")), stops_seen
