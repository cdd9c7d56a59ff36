"""FeedbackConfig validation: every bad value is named by its dotted key; the plan gets the
reward model's DeepSpeed group when the loop is on."""

from __future__ import annotations

import pytest

from rlhf_ray.config import ConfigError
from rlhf_ray.placement import resource_plan
from tests.conftest import compose

ON = ["reward=model", "reward.model_path=/models/rm", "feedback.enabled=true"]


def test_defaults_are_valid_and_plan_adds_the_reward_model_group():
    cfg = compose(ON)
    assert {r.role: r.workers for r in resource_plan(cfg)}["reward_model"] == cfg.feedback.learner.num_ranks
    assert "reward_model" not in {r.role for r in resource_plan(compose([]))}


@pytest.mark.parametrize(("override", "key"), [
    ("feedback.every=0", "feedback.every"),
    ("feedback.k=1", "feedback.k"),
    ("feedback.k=12", "feedback.k"),
    ("feedback.min_labels=0", "feedback.min_labels"),
    ("feedback.labeler=robot", "feedback.labeler"),
    ("feedback.ai_noise=1.5", "feedback.ai_noise"),
    ("feedback.heldout_every=1", "feedback.heldout_every"),
    ("feedback.replay=-1", "feedback.replay"),
    ("feedback.wait_timeout_s=0", "feedback.wait_timeout_s"),
    ("feedback.labeler=http", "feedback.labeler_url"),
    ("feedback.port=70000", "feedback.port"),
    ("feedback.learner.micro_batch_size=0", "feedback.learner"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([*ON, override])


def test_loop_needs_a_reward_model_and_http_labeler_needs_https_off_loopback():
    with pytest.raises(ConfigError, match="feedback.enabled: .*reward.kind=model"):
        compose(["feedback.enabled=true"])
    with pytest.raises(ConfigError, match="plain http is allowed only on loopback"):
        compose([*ON, "feedback.labeler=http", "feedback.labeler_url=http://judge.example/rank"])
    compose([*ON, "feedback.labeler=http", "feedback.labeler_url=http://127.0.0.1:9/rank"])
