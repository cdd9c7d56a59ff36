"""SFT and reward-model ranks: batch layouts and tokenization (no Ray), then 2-rank DeepSpeed
groups on CPU that train in lockstep, evaluate, and save models the RL side loads."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import LearnerConfig, RewardConfig
from rlhf_ray.data.datasets import DataError
from rlhf_ray.models import build_char_tokenizer, ensure_tiny_llama, load_causal_lm
from rlhf_ray.workers.supervised import (
    RewardModelWorker,
    SFTWorker,
    encode_demonstrations,
    encode_rankings,
)

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return str(ensure_tiny_llama(cache_dir / "tiny-supervised", hidden_size=32, num_layers=1, num_heads=2))


def test_demonstrations_are_right_padded_with_loss_on_response_and_eos(tokenizer):
    batch = encode_demonstrations(tokenizer, ["ab=", "abcd="], ["ba", "x"], max_len=16)
    ids = tokenizer("ab=")["input_ids"] + tokenizer("ba")["input_ids"] + [EOS]
    assert batch.input_ids.shape == (2, 7)
    assert batch.input_ids[0].tolist() == ids + [PAD]
    assert batch.attention_mask.tolist() == [[1] * 6 + [0], [1] * 7]
    # the loss covers the response and its EOS, never the prompt or padding
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1]]
    assert batch.input_ids[1, -1] == EOS


def test_rows_select_split_and_move(tokenizer):
    batch = encode_demonstrations(tokenizer, ["a=", "b=", "c=", "d="], ["a", "b", "c", "d"], max_len=8)
    left, right = batch.split(2)
    assert len(left) == len(right) == 2 and torch.equal(right.input_ids, batch.input_ids[2:])
    assert torch.equal(batch.select(torch.tensor([3, 0])).loss_mask, batch.loss_mask[[3, 0]])
    with pytest.raises(ValueError, match="3 rows into 2"):
        batch.select(slice(0, 3)).split(2)
    assert batch.to("cpu").input_ids.device.type == "cpu"


def test_overlong_rows_name_the_row(tokenizer):
    with pytest.raises(DataError, match="demos row 1: 9 tokens, more than max_len=8"):
        encode_demonstrations(tokenizer, ["a=", "abcdef="], ["a", "a"], max_len=8, source="demos")


def test_rankings_are_prompt_plus_completion_text_as_the_scorer_sees_them(tokenizer):
    batch = encode_rankings(tokenizer, ["ab=", "c="], [["ba", "ab", "b"], ["c", "cc", "x"]], max_len=8)
    assert batch.input_ids.shape == (2, 3, 5)
    assert batch.input_ids[0, 0, :5].tolist() == tokenizer("ab=ba")["input_ids"]  # no EOS
    assert batch.attention_mask[1].sum(-1).tolist() == [3, 4, 3]
    with pytest.raises(DataError, match="row 1: 2 completions, but row 0 has 3"):
        encode_rankings(tokenizer, ["a=", "b="], [["a", "b", "c"], ["a", "b"]], max_len=8)


def test_workers_build_without_ray(tiny):
    cfg = LearnerConfig(num_ranks=1)
    sft = SFTWorker("sft-0", 0, 1, cfg, tiny)
    rm = RewardModelWorker("reward_model-0", 0, 1, cfg, tiny)
    assert "rank 0/1" in repr(sft) and sft.engine is None
    assert (sft.role, rm.role) == ("sft", "reward_model")


def _group(role, worker_cls, tiny, stage, steps):
    from rlhf_ray.config import ClusterConfig
    from rlhf_ray.stage import start_group

    cfg = LearnerConfig(num_ranks=2, zero_stage=stage, micro_batch_size=2, lr=1e-2, warmup_steps=0)
    cluster = ClusterConfig(cpus_per_worker=0.5, namespace="rlhf_ray_tests", call_timeout_s=300)
    return start_group(role, worker_cls, cfg, cluster, tiny, dtype="float32", seed=0,
                       total_optimizer_steps=steps, trust_remote_code=False)


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [2, 3])
def test_sft_group_learns_the_demonstrations(ray_cluster, tiny, tokenizer, stage, tmp_path):
    group = _group("sft", SFTWorker, tiny, stage, steps=12)
    try:
        batch = encode_demonstrations(tokenizer, ["ab=", "cd=", "ef=", "gh="], ["ba", "dc", "fe", "hg"], 8)
        before = group.evaluate(batch)
        assert before["tokens"] == 12  # 4 rows x (2 letters + EOS)
        for _ in range(3):
            metrics = group.train(batch.select(torch.arange(8) % 4), steps=2)
        assert {"sft/loss", "sft/lr", "sft/grad_norm"} <= metrics.keys()
        after = group.evaluate(batch)
        assert after["nll_sum"] < 0.8 * before["nll_sum"]
        sums = group.get([w.parameter_checksum.remote() for w in group.workers], "checksum")
        assert sums[0] == pytest.approx(sums[1], rel=1e-9)
        group.save_hf(str(tmp_path))
        assert (tmp_path / "model.safetensors").exists()
        assert load_causal_lm(tmp_path).config.vocab_size == load_causal_lm(tiny).config.vocab_size
    finally:
        group.shutdown()


@pytest.mark.e2e
def test_reward_model_group_learns_rankings_and_saves_a_scorer(ray_cluster, tiny, tokenizer, tmp_path):
    from rlhf_ray.workers.reward import ModelScorer

    group = _group("reward_model", RewardModelWorker, tiny, 2, steps=12)
    try:
        prompts = ["ab=", "cd=", "ef=", "gh="]
        ranked = [["ba", "bb", "aaaa"], ["dc", "dd", "cccc"], ["fe", "ff", "eeee"], ["hg", "hh", "gggg"]]
        batch = encode_rankings(tokenizer, prompts, ranked, max_len=8)
        for _ in range(6):
            metrics = group.train(batch, steps=1)
        assert {"reward_model/loss", "reward_model/accuracy"} <= metrics.keys()
        held_out = group.evaluate(batch)
        assert held_out["pairs"] == 12 and held_out["correct_pairs"] >= 10
        group.save_hf(str(tmp_path))
        tokenizer.save_pretrained(str(tmp_path))
    finally:
        group.shutdown()
    scores = ModelScorer(RewardConfig(kind="model", model_path=str(tmp_path)))(["ab=", "ab="], ["ba", "aaaa"])
    assert scores[0] > scores[1]
