"""The controller's control flow, without Ray: ``Trainer`` driven by in-process fake groups
(tests/fakes.py).

These tests are about what the trainer decides (skip a step, abort on a guard, repair engines
and retry, save and restore its own state, evaluate every k steps), so the groups are plain
Python objects with the methods the trainer calls on them; no model runs. The real groups are
exercised end to end in tests/e2e (test_ppo.py, test_faults.py).
"""

from __future__ import annotations

import json
import math

import pytest

from rlhf_ray import checkpoint as ckpt
from rlhf_ray.groups import WorkerError
from rlhf_ray.models.tokenizer import build_char_tokenizer
from rlhf_ray.runtime import Groups
from rlhf_ray.trainer import Trainer, TrainingAborted
from tests.conftest import compose
from tests.fakes import PROMPTS, RESPONSE_LEN, FakePolicy, FakeReference, FakeReward, FakeRollout


def config(tmp_path, *overrides):
    return compose(["algo=grpo", "rollout.n_samples_per_prompt=2", "trainer.prompts_per_step=2",
                    "policy.num_ranks=1", "policy.micro_batch_size=2", "sync.backend=object_store",
                    "sync.check_samples=2", "trainer.total_steps=3", f"trainer.output_dir={tmp_path}",
                    *overrides])


def make_trainer(cfg, tmp_path, *, reward=None, reference=None, policy=None, eval_prompts=None):
    tokenizer = build_char_tokenizer()
    groups = Groups(rollout=FakeRollout(cfg.rollout.n_samples_per_prompt), reward=reward or FakeReward(),
                    reference=reference or FakeReference(), policy=policy or FakePolicy(), critic=None)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return Trainer(cfg, groups, tokenizer, list(PROMPTS), ids, tmp_path, eval_prompts)


def rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_runs_to_the_end_and_every_engine_holds_the_last_version(tmp_path):
    t = make_trainer(config(tmp_path), tmp_path)
    summary = t.fit()
    assert summary["steps"] == 3 and summary["weight_version"] == 3
    assert summary["engine_versions"] == {"rollout-0": 3, "rollout-1": 3}
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
    assert [r["rollout/weight_version"] for r in rows(tmp_path)] == [1.0, 2.0, 3.0]
    # each step's samples were made by the version before it
    assert [{s.weight_version for s in batch} for batch in t.g.rollout.returned] == [{0}, {1}, {2}]


def test_nonfinite_reward_skips_the_step_with_skip_step(tmp_path):
    nan_on_second_call = lambda call, texts: [math.nan if call == 1 and i == 0 else 0.25 * i  # noqa: E731
                                              for i in range(len(texts))]
    cfg = config(tmp_path, "reward.nan_policy=skip_step")
    t = make_trainer(cfg, tmp_path, reward=FakeReward(nan_on_second_call))
    summary = t.fit()
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [1, 2, 3]
    assert r[1]["trainer/skipped"] == 1.0 and r[1]["reward/nonfinite"] == 1.0
    assert "trainer/skipped" not in r[0] and "trainer/skipped" not in r[2]
    # the skipped step neither updated nor synced: three steps, two updates, two versions
    assert len(t.g.policy.updates) == 2
    assert summary["weight_version"] == 2 and summary["engine_versions"] == {"rollout-0": 2, "rollout-1": 2}


def test_nonfinite_reward_is_masked_with_mask(tmp_path):
    nan_first = lambda call, texts: [math.nan if i == 0 else 1.0 for i in range(len(texts))]  # noqa: E731
    t = make_trainer(config(tmp_path, "reward.nan_policy=mask", "trainer.total_steps=1"), tmp_path,
                     reward=FakeReward(nan_first))
    t.fit()
    (row,) = rows(tmp_path)
    assert "trainer/skipped" not in row and row["reward/nonfinite"] == 1.0 and len(t.g.policy.updates) == 1


# KL per token with log(ref / pi) = -1, by estimator (Schulman's k1, k2, k3): 1, 1/2 * 1^2, e^-1 - 1 + 1
KL_PER_TOKEN = {"k1": 1.0, "k2": 0.5, "k3": math.exp(-1)}


def test_kl_ceiling_aborts_naming_the_key(tmp_path):
    cfg = config(tmp_path, "algo.kl_ceiling=1.0")
    kl = RESPONSE_LEN * KL_PER_TOKEN[cfg.algo.kl_estimator]  # the sequence KL, above 1.0 for each estimator
    t = make_trainer(cfg, tmp_path, reference=FakeReference(1.0))
    with pytest.raises(TrainingAborted, match=rf"step 1: kl/mean {kl:.3f} exceeds algo.kl_ceiling=1.0"):
        t.fit()
    assert rows(tmp_path)[0]["kl/mean"] == pytest.approx(kl)
    assert len(t.g.policy.updates) == 1  # the step that crossed it ran; no further step did


def test_kl_below_the_ceiling_runs_on(tmp_path):
    estimator = config(tmp_path).algo.kl_estimator
    ceiling = 1.1 * RESPONSE_LEN * KL_PER_TOKEN[estimator]
    t = make_trainer(config(tmp_path, f"algo.kl_ceiling={ceiling}"), tmp_path, reference=FakeReference(1.0))
    assert t.fit()["steps"] == 3


def test_nonfinite_update_streak_aborts(tmp_path):
    cfg = config(tmp_path, "trainer.max_nonfinite_updates=2", "trainer.total_steps=5")
    t = make_trainer(cfg, tmp_path, policy=FakePolicy(nonfinite=[1, 0, 1, 2, 0]))
    with pytest.raises(TrainingAborted, match=r"2 updates in a row .*trainer.max_nonfinite_updates=2"):
        t.fit()
    # steps 1 and 3 alone did not abort (a finite update in between resets the streak); 3+4 did
    assert t.step_index == 4 and len(t.g.policy.updates) == 4


def test_a_dead_engine_is_repaired_and_the_retry_draws_the_same_samples(tmp_path):
    reference = make_trainer(config(tmp_path / "a", "trainer.total_steps=2"), tmp_path / "a")
    reference.fit()
    t = make_trainer(config(tmp_path / "b", "trainer.total_steps=2"), tmp_path / "b")
    real_generate = t.g.rollout.generate

    def die_on_step_2(*args, **kwargs):
        if t.step_index == 1 and t.g.rollout.generate_calls == 1:
            t.g.rollout.fail_next = 1
        return real_generate(*args, **kwargs)

    t.g.rollout.generate = die_on_step_2
    summary = t.fit()
    assert t.g.rollout.generate_calls == 3  # step 1, the failed step 2, its retry
    assert summary["engine_versions"] == {"rollout-0": 2, "rollout-1": 2}
    # none lost, none duplicated: the same samples as the run without a failure, made by v1
    assert t.g.rollout.returned == reference.g.rollout.returned
    assert {s.weight_version for s in t.g.rollout.returned[1]} == {1}


def test_engine_repairs_are_bounded(tmp_path):
    t = make_trainer(config(tmp_path, "trainer.max_engine_repairs=1"), tmp_path)
    t.g.rollout.fail_next = 2
    with pytest.raises(WorkerError, match="rollout-1"):
        t.fit()
    assert t.g.rollout.generate_calls == 2


def test_checkpoint_round_trip_restores_the_driver_state(tmp_path):
    overrides = ("trainer.total_steps=4", "trainer.save_every=2", "trainer.stop_after_steps=2", "algo.kl_target=0.1",
                 "reward.normalize=true")
    first = make_trainer(config(tmp_path, *overrides), tmp_path, reference=FakeReference(0.1))
    stopped = first.fit()
    assert (stopped["steps"], stopped["stopped"], stopped["weight_version"]) == (2, True, 2)
    saved = first.state_dict()
    # the state is not the initial one, or restoring it would prove nothing
    assert saved["kl_controller"] != make_trainer(config(tmp_path, *overrides), tmp_path).kl_ctl.state_dict()
    assert saved["reward_moments"]["count"] == 8 and saved["sampler"]["position"] == 4

    second = make_trainer(config(tmp_path, *overrides), tmp_path, reference=FakeReference(0.1))
    second.maybe_resume()
    assert second.state_dict() == saved
    path = ckpt.step_dir(tmp_path / "checkpoints", 2)
    assert second.g.policy.loaded == [f"{path}/policy"]  # step_dir gives a str (path or URI)
    assert second.g.rollout.held == {"rollout-0": 2, "rollout-1": 2}  # engines got the weights back

    # both continue identically: the same prompts next, the same KL coefficient in the update
    first_next = first.sampler.next_batch()
    assert second.sampler.next_batch() == first_next
    assert second.kl_ctl.value == first.kl_ctl.value


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    make_trainer(config(tmp_path, "trainer.save_every=1", "trainer.total_steps=1"), tmp_path).fit()
    other = make_trainer(config(tmp_path, "trainer.save_every=1", "trainer.total_steps=2", "algo.clip_eps=0.3"),
                         tmp_path)
    with pytest.raises(ckpt.CheckpointMismatchError, match="resume_ignore_config"):
        other.maybe_resume()


def test_eval_every_logs_held_out_gold_and_proxy(tmp_path):
    t = make_trainer(config(tmp_path, "trainer.eval_every=2", "trainer.total_steps=4"), tmp_path,
                     eval_prompts=["rev xyz=", "rev wv="])
    t.fit()
    r = rows(tmp_path)
    assert [("eval/reward" in x, "eval/gold" in x) for x in r] == [(False, False), (True, True)] * 2
    # one sample per held-out prompt, scored by the reward group: gold = reward + 1 in the fake
    assert r[1]["eval/gold"] == pytest.approx(r[1]["eval/reward"] + 1.0)
    # steps 2 and 4 and the final evaluation: one sample per held-out prompt from the current version
    assert [r for r in t.g.rollout.requests if r[1] == 1] == [(2, 1, 2), (2, 1, 4), (2, 1, 4)]


def test_reward_nonfinite_mean_is_recorded_finite_only(tmp_path):
    # masked rows do not enter reward/mean: [nan, 1.0] per step -> mean 1.0
    half = lambda call, texts: [math.nan if i % 2 == 0 else 1.0 for i in range(len(texts))]  # noqa: E731
    make_trainer(config(tmp_path, "reward.nan_policy=mask", "trainer.total_steps=1"), tmp_path,
                 reward=FakeReward(half)).fit()
    assert rows(tmp_path)[0]["reward/mean"] == 1.0 and rows(tmp_path)[0]["reward/nonfinite"] == 2.0


def test_groups_fakes_have_the_methods_the_trainer_calls():
    """If the trainer starts calling a group method the fakes lack, this names it (keep in step
    with rlhf_ray/groups.py when the group interface changes)."""
    from rlhf_ray import groups

    for fake, real in ((FakeRollout, groups.RolloutGroup), (FakePolicy, groups.PolicyGroup),
                       (FakeReward, groups.RewardGroup), (FakeReference, groups.ReferenceGroup)):
        used = {"generate", "versions", "receive_weights", "score_tokens", "score", "compute_logprobs",
                "submit_logprobs_replicated", "update", "weight_manifest", "send_weights", "save_checkpoint",
                "load_checkpoint", "save_hf", "adapter_config"}
        missing = {m for m in used if hasattr(real, m) and not hasattr(fake, m)}
        assert not missing, (fake.__name__, missing)
