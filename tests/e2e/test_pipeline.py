"""The InstructGPT pipeline end to end on the real stack, shortened: a few steps of SFT, reward
model, PPO against it and the evaluation, with a very small model."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_ray.data.generate import task_data_dir
from rlhf_ray.pipeline import run
from tests.e2e.exports import assert_causal_lm_export, assert_reward_model_export
from tests.test_pipeline import pipeline_config

pytestmark = pytest.mark.e2e

SHORT = [
    "sft.model.tiny.hidden_size=64", "sft.model.tiny.num_layers=1", "sft.model.tiny.num_heads=2",
    "sft.epochs=1", "sft.data.max_train_rows=96", "sft.data.max_eval_rows=16", "sft.learner.micro_batch_size=8",
    "sft.steps_per_call=3",
    "reward_model.epochs=1", "reward_model.data.max_train_rows=32", "reward_model.data.max_eval_rows=16",
    "reward_model.learner.micro_batch_size=4",
    "ppo.trainer.total_steps=2", "ppo.trainer.prompts_per_step=4", "ppo.rollout.num_engines=1",
    "ppo.policy.num_ranks=1", "ppo.critic.num_ranks=1", "ppo.policy.micro_batch_size=4", "ppo.critic.micro_batch_size=4",
    "eval.max_prompts=8", "eval.rollout.n_samples_per_prompt=2",
]


def test_pipeline_sft_reward_model_ppo_evaluate(ray_cluster, tmp_path, cache_dir):
    out = tmp_path / "run"
    summary = run(pipeline_config(SHORT + [f"sft.model.cache_dir={cache_dir}"]), out)
    o = summary["outputs"]
    for key in ("sft_model", "reward_model", "ppo_model"):
        assert (out / o[key] / "model.safetensors").exists(), key
        assert (out / o[key] / "tokenizer.json").exists(), key
    assert json.loads((out / "reward_model" / "model" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]
    # each stage's held-out numbers, against counts taken from the data files themselves: SFT
    # scores every character of the assistant turn plus its end-of-turn token of the first 16
    # held-out chat rows (one token per character), the reward model every ranked pair of its first 16 rows; training lowered the loss
    data = task_data_dir(cache_dir, 0)
    sft_rows = [json.loads(line) for line in (data / "sft_eval.jsonl").read_text().splitlines()[:16]]
    sft = summary["sft"]
    assert sft["eval/tokens"] == sum(len(r["messages"][-1]["content"]) + 1 for r in sft_rows)
    assert sft["eval/loss"] < sft["eval/loss_before"]
    assert sft["eval/perplexity"] == pytest.approx(math.exp(sft["eval/loss"]), rel=1e-5)
    rm_rows = [json.loads(line) for line in (data / "comparisons_eval.jsonl").read_text().splitlines()[:16]]
    rm = summary["reward_model"]
    assert rm["eval/pairs"] == sum(math.comb(len(r["completions"]), 2) for r in rm_rows)
    correct = rm["eval/accuracy"] * rm["eval/pairs"]
    assert correct == pytest.approx(round(correct), abs=1e-3)  # a whole number of pairs ordered right
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("reward/gold" in r for r in rows)
    # the comparison: both policies, both decodings, gold + reward model + KL to the SFT policy
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert list(report["policies"]) == ["sft", "ppo"] and report["prompts"] == 8
    for name, r in report["policies"].items():
        assert {"gold", "exact", "reward_model", "kl"} <= r["sampled"].keys(), name
        assert {"gold", "exact", "reward_model"} <= r["greedy"].keys(), name
    assert report["policies"]["sft"]["sampled"]["kl"] == pytest.approx(0.0, abs=1e-5)  # its own reference
    assert (out / "eval" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert set(summary["seconds"]) == {"sft", "reward_model", "ppo", "evaluate", "total"}
    # exports users can serve as they are: HF loads (policies also in vLLM), tokenizer + chat template
    assert_reward_model_export(out / o["reward_model"])
    assert_causal_lm_export(out / o["sft_model"], with_vllm=False)
    assert_causal_lm_export(out / o["ppo_model"])
