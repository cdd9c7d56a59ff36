"""Actor-learner mode on the real stack (Ray + vLLM CPU + DeepSpeed CPU, tiny model): one set of
worker groups (2 engines, 1 policy rank, GRPO) is shared by every run of this module.

- ``max_staleness=0`` is the synchronous step: nothing generated while the learner updates,
  every token trained on the weights that generated it.
- ``max_staleness=1, 2``: no trained token is older than the bound (from the per-token versions
  the engines record), and engines generated while the learner updated (recorded intervals).
- a run stopped with batches in flight resumes with exactly the prompts of a straight run.
- an engine killed during asynchronous generation is restarted, re-synced, its share re-issued,
  with either sync backend (collective: no wait for the group's timeout).
"""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import pytest
import ray

from rlhf_ray.data import load_prompt_dataset, prompt_inputs, tokenize_prompts_with_index
from rlhf_ray.data.chat import render_prompt
from rlhf_ray.data.sampler import PromptSampler
from rlhf_ray.models import load_tokenizer
from rlhf_ray.runtime import build_groups, resolve_assets
from rlhf_ray.trainer import Trainer
from tests.conftest import compose

pytestmark = pytest.mark.e2e

BASE = ["algo=grpo", "rollout.num_engines=2", "policy.num_ranks=1", "trainer.prompts_per_step=8",
        "sync.backend=object_store", "rollout.chunk_tokens=3", "trainer.total_steps=5"]


def config(run_dir: Path, cache_dir: Path, extra: list[str]):
    return compose([f"trainer.output_dir={run_dir}", f"model.cache_dir={cache_dir}", *BASE, *extra])


@pytest.fixture(scope="module")
def stack(ray_cluster, cache_dir, tmp_path_factory):
    """Groups built once; ``fit(extra, run_dir)`` trains a fresh Trainer on them."""
    cfg = config(tmp_path_factory.mktemp("build"), cache_dir, [])
    assets = resolve_assets(cfg)
    tokenizer = load_tokenizer(assets.policy_path)
    prompts = prompt_inputs(load_prompt_dataset(assets.train_prompts))
    ids, kept = tokenize_prompts_with_index(tokenizer, prompts, cfg.data.max_prompt_len, "truncate")
    prompts = [render_prompt(tokenizer, prompts[i]) for i in kept]  # the text rewards see, as train.py
    groups = build_groups(cfg, assets)

    def fit(extra: list[str], run_dir: Path) -> tuple[dict, list[dict], Trainer]:
        trainer = Trainer(config(run_dir, cache_dir, extra), groups, tokenizer, prompts, ids, run_dir)
        trainer.sync.push(0)  # the engines may hold an earlier run's version number
        summary = trainer.fit()
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return summary, rows, trainer

    yield fit, groups
    groups.shutdown()


def test_every_worker_has_its_gc_back_after_start_up(stack):
    """Workers import their stack with the GC off (rlhf_ray/__init__.py); each role turns it
    back on, over a frozen start-up heap, once its imports are done."""
    _, groups = stack
    for group in groups.all():
        for worker, state in zip(group.workers, group.get(
                [w.__ray_call__.remote(lambda self: (gc.isenabled(), gc.get_freeze_count() > 0)) for w in group.workers],
                "gc"), strict=True):
            assert state == (True, True), (worker, state)


def test_max_staleness_zero_is_the_synchronous_step(stack, tmp_path):
    fit, _ = stack
    summary, rows, _ = fit(["trainer.max_staleness=0", "trainer.total_steps=3"], tmp_path)
    assert [r["rollout/weight_version"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout/staleness_max"] == 0 and r["rollout/overlap_s"] == 0.0
        assert r["sync/check_logprob_diff"] < 1e-4 and r["rollout/samples"] == 8 * 4


@pytest.mark.parametrize("k", [1, 2])
def test_bounded_staleness_with_overlap(stack, tmp_path, k):
    fit, _ = stack
    summary, rows, _ = fit([f"trainer.max_staleness={k}"], tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and summary["weight_version"] == 5
    assert summary["engine_versions"] == {"rollout-0": 5, "rollout-1": 5}
    for r in rows:
        # computed per token from the versions the engines recorded; nothing dropped
        assert 0 <= r["rollout/staleness_max"] <= k and r["rollout/dropped_samples"] == 0
        assert r["rollout/samples"] == 8 * 4
    assert max(r["rollout/staleness_max"] for r in rows) >= 1  # it really trained off-policy
    # engine generation (its recorded wall-clock spans) overlapped learner updates
    assert sum(r["rollout/overlap_s"] for r in rows) > 0
    assert all(r["sync/check_logprob_diff"] < 1e-4 for r in rows if "sync/check_logprob_diff" in r)


def test_resume_with_batches_in_flight(stack, tmp_path):
    """Stopped after step 2 with a batch in flight: the checkpoint records it, the resumed
    run re-issues it, and the prompts trained per step equal a straight run's."""
    fit, _ = stack
    common = ["trainer.max_staleness=1", "trainer.total_steps=4", "trainer.save_every=2"]
    _, straight, _ = fit(common, tmp_path / "straight")
    first, _, trainer = fit([*common, "trainer.stop_after_steps=2"], tmp_path / "resumed")
    assert first["stopped"]
    state = json.loads(next((tmp_path / "resumed/checkpoints").glob("step_00000002/driver.json")).read_text())
    assert len(state["in_flight"]) == 1  # max_staleness batches stay in flight after a step
    _, resumed, _ = fit(common, tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["rollout/prompt_indices"] for r in resumed] == [r["rollout/prompt_indices"] for r in straight]


@pytest.mark.parametrize("backend", ["object_store", "collective"])
def test_engine_killed_during_async_generation(stack, tmp_path, caplog, backend):
    """Killed after step 1 while generating: the driver sees the dead engine within seconds (its
    calls fail), Ray restarts it, it is re-synced and its share re-issued. With the collective
    backend the group's timeout is set to 300 s, gloo's default: a push in flight to the dead
    engine must not wait for it (each engine rank gets its own sends, the group is rebuilt)."""
    fit, groups = stack
    run_dir = tmp_path / "run"
    killed_at: list[float] = []

    def kill_when_generating():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed_at:  # after step 1, while generating
            if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 1:
                ray.kill(groups.rollout.workers[1], no_restart=False)  # Ray restarts it, initial weights
                killed_at.append(time.time())
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_generating, daemon=True)
    killer.start()
    summary, rows, trainer = fit(["trainer.max_staleness=1", "trainer.total_steps=4", f"sync.backend={backend}",
                                  "sync.timeout_s=300"], run_dir)
    assert killed_at and "rollout-1" in caplog.text  # it died mid-run; the repair named it
    noticed = min(r.created for r in caplog.records if "rollout-1" in r.getMessage() and r.created >= killed_at[0])
    assert noticed - killed_at[0] < 30  # seen through its failed calls, not a transport timeout
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert summary["engine_versions"] == {"rollout-0": 4, "rollout-1": 4}
    assert max(r["timing/step"] for r in rows) < 150  # no step waited for the 300 s group timeout
    sampler = PromptSampler(len(trainer.prompt_ids), 8, trainer.cfg.seed)
    assert [r["rollout/prompt_indices"] for r in rows] == [sampler.next_batch() for _ in range(4)]  # none lost
    for r in rows:
        assert r["rollout/samples"] == 8 * 4  # none lost, none duplicated
        assert r["rollout/staleness_max"] <= 1
