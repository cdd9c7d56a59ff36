"""End to end on the real stack (Ray + vLLM CPU + DeepSpeed CPU) with the tiny model: the
default topology for PPO, ZeRO-3 sync, and every other algorithm for two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.train import run
from tests.conftest import compose

pytestmark = pytest.mark.e2e

REQUIRED = ["reward/mean", "kl/mean", "policy/loss", "policy/clipfrac", "policy/approx_kl",
            "rollout/weight_version", "sync/check_logprob_diff", "rollout/tokens_per_s", "timing/step",
            "timing/rollout", "timing/reward", "timing/experience", "timing/advantages", "timing/update",
            "timing/sync"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def train(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    cfg = compose([f"trainer.output_dir={tmp_path}", f"model.cache_dir={cache_dir}", *overrides])
    summary = run(cfg, tmp_path)
    return summary, read_metrics(tmp_path)


def test_ppo_two_of_each(ppo_two_of_each, cache_dir):
    """2 engines, 2 ZeRO-2 policy ranks, 2 critic ranks, a reference and a reward worker
    (tests/e2e/conftest.py: the run, 4 steps, which test_faults.py also resumes)."""
    run_dir, summary = ppo_two_of_each
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        missing = [k for k in REQUIRED + ["critic/loss"] if r.get(k) is None]
        assert not missing, missing
        # fp32 weights on both sides: vLLM and the learner agree on the new weights
        assert r["sync/check_logprob_diff"] < 1e-4
    assert [r["rollout/weight_version"] for r in rows] == [1, 2, 3, 4]
    assert summary["engine_versions"] == {"rollout-0": 4, "rollout-1": 4}
    assert (run_dir / "summary.json").exists() and (run_dir / "tensorboard").is_dir()
    tiny = next(cache_dir.glob("tiny-llama-*"))
    before, after = weights(tiny), weights(run_dir / "final")
    assert before.keys() == after.keys()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed == len(before), f"only {changed}/{len(before)} tensors changed"


def test_zero3_grpo_two_ranks(ray_cluster, tmp_path, cache_dir):
    """ZeRO-3 shards are gathered bucket by bucket for the sync; GRPO needs no critic."""
    summary, rows = train(tmp_path, cache_dir, [
        "algo=grpo", "policy.zero_stage=3", "policy.num_ranks=2", "rollout.num_engines=1",
        "trainer.total_steps=2", "trainer.prompts_per_step=8", "sync.bucket_mb=1",
    ])
    assert len(rows) == 2 and summary["engine_versions"] == {"rollout-0": 2}
    assert rows[-1]["sync/buckets"] > 1
    assert all(r["sync/check_logprob_diff"] < 1e-4 for r in rows)
    assert "critic/loss" not in rows[-1] and rows[-1]["policy/kl_loss"] is not None


@pytest.fixture
def reward_server():
    from tests.workers.test_reward import RewardServer

    server = RewardServer()
    yield server
    server.close()


@pytest.mark.parametrize("algo,extra", [
    ("a2c", []),
    ("rloo", ["sync.backend=object_store"]),
    ("reinforce_pp", ["reward=http"]),  # scored by a real HTTP service on loopback
])
def test_algorithm_two_steps(ray_cluster, tmp_path, cache_dir, algo, extra, reward_server):
    if "reward=http" in extra:
        extra = [*extra, f"reward.url={reward_server.url}", "reward.token_env="]
    summary, rows = train(tmp_path, cache_dir, [
        f"algo={algo}", "rollout.num_engines=1", "policy.num_ranks=1", "critic.num_ranks=1",
        "trainer.total_steps=2", "trainer.prompts_per_step=8", *extra,
    ])
    assert len(rows) == 2 and summary["weight_version"] == 2
    assert all(r["sync/check_logprob_diff"] < 1e-4 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["policy/loss"])) for r in rows)
    if "reward=http" in extra:
        assert reward_server.requests >= 2  # every step's completions went to the service
