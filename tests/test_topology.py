"""The default topology (rlhf_ray/topology.py): auto counts resolved once, from the cores,
into every config that has them; explicit values are kept."""

from __future__ import annotations

import json
from dataclasses import asdict

from rlhf_ray import topology
from rlhf_ray.config import ClusterConfig, Config
from rlhf_ray.stage_config import PipelineConfig, RewardModelConfig, SFTConfig
from tests.conftest import compose


def test_rule_by_cores():
    # one worker per role with every core; a second one from 16 cores (at most 2)
    assert [topology.auto_workers("cpu", n) for n in (1, 2, 7, 8, 16, 64)] == [1, 1, 1, 1, 2, 2]
    assert [topology.auto_threads("cpu", n) for n in (1, 2, 7, 8, 16, 20)] == [1, 2, 7, 8, 8, 10]
    assert topology.auto_workers("cuda", 64) == 1 and topology.auto_threads("cuda", 64) == 4


def test_auto_resolved_in_every_config(monkeypatch):
    monkeypatch.setattr(topology, "machine_cores", lambda: 2)
    cfg = compose(["algo=ppo"])
    assert (cfg.rollout.num_engines, cfg.policy.num_ranks, cfg.critic.num_ranks) == (1, 1, 1)
    assert cfg.cluster.threads_per_worker == 2
    assert ClusterConfig().threads_per_worker == 2 and Config().rollout.num_engines == 1
    assert SFTConfig().learner.num_ranks == RewardModelConfig().learner.num_ranks == 1
    assert PipelineConfig().ppo.policy.num_ranks == 1
    # the run's config.json records what ran, not 0
    assert json.loads(json.dumps(asdict(cfg)))["cluster"]["threads_per_worker"] == 2


def test_explicit_values_kept(monkeypatch):
    monkeypatch.setattr(topology, "machine_cores", lambda: 64)
    cfg = compose(["rollout.num_engines=3", "policy.num_ranks=2", "cluster.threads_per_worker=1"])
    assert (cfg.rollout.num_engines, cfg.policy.num_ranks, cfg.cluster.threads_per_worker) == (3, 2, 1)
    assert cfg.critic.num_ranks == 2  # left at auto: capped at 2
