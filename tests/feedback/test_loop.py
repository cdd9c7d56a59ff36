"""The feedback loop end to end on the real stack (Ray + vLLM CPU + DeepSpeed CPU, tiny model):
labels from the ai labeler retrain the reward model, two new versions are swapped into the
running reward workers during one run, and a resumed run keeps the labels and the versions.
Plus the reward worker's in-place swap and the labelers, without Ray."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlhf_ray.config import RewardConfig
from rlhf_ray.feedback.labelers import AILabeler, HttpLabeler, LabelerThread, LabelerTimeout
from rlhf_ray.feedback.service import FeedbackServer
from tests.conftest import compose

LOOP = ["algo=grpo", "reward=model", "rollout.num_engines=1", "policy.num_ranks=1", "trainer.prompts_per_step=4",
        "policy.micro_batch_size=4", "feedback.enabled=true", "feedback.every=1", "feedback.prompts_per_round=8",
        "feedback.k=3", "feedback.min_labels=8", "feedback.wait=true", "feedback.wait_timeout_s=120",
        "feedback.heldout_every=4", "feedback.learner.micro_batch_size=2", "feedback.rm_epochs=1",
        "feedback.min_accuracy_gain=-1.0", "feedback.token_env=FB_TEST_TOKEN", "trainer.total_steps=3",
        "trainer.save_every=2",
        # random rankings: the untrained tiny policy's completions nearly all score 0 with the gold
        # labeler, and tied completions are no preference (nothing to train on)
        "feedback.ai_noise=1.0"]


def tiny_model(cache_dir: Path) -> str:
    from rlhf_ray.runtime import resolve_assets

    return resolve_assets(compose([f"model.cache_dir={cache_dir}"])).policy_path


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_two_versions_swapped_in_and_resume_keeps_labels(ray_cluster, tmp_path, cache_dir, monkeypatch):
    from rlhf_ray.train import run

    monkeypatch.setenv("FB_TEST_TOKEN", "loop-t0ken")  # the service requires it on loopback too
    model = tiny_model(cache_dir)  # a fresh scalar head on the tiny LM: a (bad) version-0 reward model
    overrides = [f"trainer.output_dir={tmp_path}", f"model.cache_dir={cache_dir}", f"reward.model_path={model}", *LOOP]
    run(compose([*overrides, "trainer.stop_after_steps=2"]), tmp_path)
    first = rows(tmp_path)
    assert [r["reward/model_version"] for r in first] == [1.0, 2.0]  # read back from the reward workers
    assert [r["feedback/labels"] for r in first] == [8.0, 16.0]
    assert all(0.0 <= r["reward_model/heldout_accuracy"] <= 1.0 for r in first)
    assert (tmp_path / "feedback" / "reward_model_v2" / "model.safetensors").exists()
    ckpt = tmp_path / "checkpoints" / "step_00000002" / "feedback"
    assert sqlite3.connect(ckpt / "labels.db").execute("SELECT COUNT(*) FROM comparisons").fetchone()[0] == 16

    run(compose(overrides), tmp_path)  # resumes at step 2
    resumed = rows(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    third = resumed[-1]
    assert third["reward/model_version"] == 3.0 and third["feedback/labels"] == 24.0
    assert third["reward_model/train_comparisons"] == 18.0  # all 24 labels so far, every 4th held out
    db = sqlite3.connect(tmp_path / "feedback" / "labels.db")
    versions = [v for (v,) in db.execute("SELECT policy_version FROM comparisons ORDER BY id")]
    assert versions == [1] * 8 + [2] * 8 + [3] * 8  # each round labels the policy of its step


def test_reward_worker_swaps_the_model_in_place(cache_dir, tmp_path):
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.workers.reward import RewardWorker

    model = tiny_model(cache_dir)
    worker = RewardWorker("reward-0", RewardConfig(kind="model", model_path=model))
    before = worker.score(["rev abc="], ["cba"])
    assert before["model_version"] == [0.0] and len(before["reward"]) == 1
    rm = worker.scorer.model
    rm.score.weight.data.mul_(-1.0)  # a different version: the score's sign flips
    rm.save_pretrained(tmp_path / "v1")
    load_tokenizer(model).save_pretrained(str(tmp_path / "v1"))
    rm.score.weight.data.mul_(-1.0)
    assert worker.load_reward_model(str(tmp_path / "v1"), 1) == 1
    after = worker.score(["rev abc="], ["cba"])
    assert after["model_version"] == [1.0] and worker.reward_model_version() == 1
    assert after["reward"][0] == pytest.approx(-before["reward"][0], rel=1e-4)


def test_ai_labeler_ranks_by_gold_and_noise_shuffles():
    exact = AILabeler(noise=0.0, seed=1)
    assert exact("rev abc=", ["abc", "cba", "cbb"]) == ([1, 2, 0], [])  # gold 1/3, 1, 2/3
    # gold 1, 2/3, 2/3, 1/3: the two 2/3 (either order) are reported tied (positions 1 and 2)
    ranking, ties = exact("rev abc=", ["cba", "cbb", "caa", "abc"])
    assert ranking in ([0, 1, 2, 3], [0, 2, 1, 3]) and ties == [1]
    noisy = AILabeler(noise=1.0, seed=1)
    rankings = {tuple(noisy("rev abcd=", ["dcba", "dcbb", "dcaa", "abcd"])[0]) for _ in range(30)}
    assert len(rankings) > 5


class SlowJudge:
    """An external labeler that answers after ``delay`` seconds."""

    def __init__(self, delay: float):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(outer.delay)
                data = json.dumps({"ranking": list(range(len(body["completions"])))[::-1]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the labeler gave up waiting: that is the point
                    pass

            def log_message(self, *args):
                pass

        self.delay = delay
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/rank"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_http_labeler_timeouts_are_counted_and_never_block(tmp_path):
    judge = SlowJudge(delay=0.0)
    assert HttpLabeler(judge.url)("p", ["a", "b", "c"]) == ([2, 1, 0], [])  # no "ties" in the reply: none
    judge.delay = 2.0
    with pytest.raises(LabelerTimeout):
        HttpLabeler(judge.url, timeout_s=0.2, retries=2)("p", ["a", "b"])
    server = FeedbackServer(tmp_path / "l.db")
    try:
        server.store.add_tasks([("rev ab=", ["ab", "ba"])], policy_version=0)
        thread = LabelerThread(server.url, HttpLabeler(judge.url, timeout_s=0.2, retries=1), "judge", poll_s=0.05)
        deadline = time.monotonic() + 20
        while thread.counts["timeouts"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        thread.stop()
        assert thread.counts["timeouts"] >= 2 and thread.counts["labeled"] == 0
        assert time.monotonic() - start < 5
        judge.delay = 0.0  # the service comes back: the task gets labeled
        thread = LabelerThread(server.url, HttpLabeler(judge.url, timeout_s=2.0), "judge", poll_s=0.05)
        while not server.store.comparisons() and time.monotonic() < deadline + 20:
            time.sleep(0.05)
        thread.stop()
        assert [c.ranked for c in server.store.comparisons()] == [["ba", "ab"]]
    finally:
        server.close()
        judge.httpd.shutdown()


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeRewardGroup:
    """Reward workers as far as the loop sees them (control flow only)."""

    def __init__(self):
        self.loaded: list[tuple[str, int]] = []
        self.version = 0
        worker = type("W", (), {})()
        worker.load_reward_model = _Remote(self._load)
        worker.reward_model_version = _Remote(lambda: self.version)
        self.workers = [worker]

    def _load(self, path, version):
        self.loaded.append((path, version))
        self.version = version
        return version

    def get(self, refs, what):
        return refs


class FakeRewardModelGroup:
    """Held-out accuracies in a fixed order: before training, after training."""

    def __init__(self, accuracies):
        self.accuracies, self.calls = list(accuracies), []

    def evaluate(self, batch):
        a = self.accuracies.pop(0)
        return {"correct_pairs": a * 10, "pairs": 10.0, "loss_sum": 1.0, "rows": float(len(batch))}

    def train(self, batch, steps):
        self.calls.append(("train", len(batch), steps))
        return {"reward_model/loss": 0.5}

    def __getattr__(self, name):  # save_checkpoint, load_checkpoint, save_hf
        return lambda path: self.calls.append((name, Path(path).name))


@pytest.mark.e2e
def test_a_worse_candidate_is_not_swapped_in(ray_cluster, tmp_path, cache_dir):
    import ray

    from rlhf_ray.feedback.loop import FeedbackLoop
    from rlhf_ray.models import load_tokenizer

    model = tiny_model(cache_dir)
    cfg = compose([f"model.cache_dir={cache_dir}", "reward=model", f"reward.model_path={model}",
                   "feedback.enabled=true", "feedback.labeler=people", "feedback.min_labels=10",
                   "feedback.heldout_every=5", "feedback.learner.micro_batch_size=2"])
    groups = type("G", (), {"reward": FakeRewardGroup()})()
    loop = FeedbackLoop(cfg, groups, load_tokenizer(model), ["rev ab="], [[1]], tmp_path)
    from rlhf_ray.feedback.service import FeedbackService

    loop.service = ray.remote(FeedbackService).options(num_cpus=0).remote(str(tmp_path / "l.db"))
    ids = ray.get(loop.service.add_tasks.remote([(f"rev {w}=", [w[::-1], w]) for w in ["ab", "cd"] * 5], 1))
    from rlhf_ray.feedback.store import LabelStore

    store = LabelStore(tmp_path / "l.db")
    for t in ids:
        store.submit(t, [0, 1], 1, "ann")
    try:
        loop.rm = FakeRewardModelGroup([0.8, 0.6])  # the candidate is worse
        m = loop.retrain()
        assert m["reward_model/candidate_accuracy"] == pytest.approx(0.6)
        assert loop.version == 0 and groups.reward.loaded == [] and loop.counts["rejected_versions"] == 1
        assert ("load_checkpoint", "deployed") in loop.rm.calls  # back to the deployed weights
        assert loop.metrics()["reward_model/heldout_accuracy"] == pytest.approx(0.8)
        assert loop.new_labels() == 0  # those labels were used; the next retraining waits for min_labels more
        loop.trained_through = 0
        loop.rm = FakeRewardModelGroup([0.8, 0.8])  # as good: swapped in
        loop.retrain()
        assert loop.version == 1 and groups.reward.loaded == [(str(tmp_path / "feedback" / "reward_model_v1"), 1)]
        assert ("train", 8, 4) in loop.rm.calls  # 10 labels, every 5th held out, 4 steps of 2
        assert loop.metrics()["reward/model_version"] == 1.0
    finally:
        store.close()
        ray.kill(loop.service)


def test_rankings_of_any_size_become_their_pairs():
    from rlhf_ray.feedback.loop import as_pairs
    from rlhf_ray.feedback.store import Comparison

    three = Comparison(1, "t1", "rev abc=", ["cba", "cbb", "abc"], 0, "ai", 0.0)
    two = Comparison(2, "t2", "rev ab=", ["ba", "ab"], 0, "ai", 0.0)
    prompts, pairs = as_pairs([three, two])
    assert prompts == ["rev abc="] * 3 + ["rev ab="]
    assert pairs == [["cba", "cbb"], ["cba", "abc"], ["cbb", "abc"], ["ba", "ab"]]
    # ties at positions 1 and 2: "b" ~ "c" ~ "d" -> only the pairs with "a" are preferences
    tied = Comparison(3, "t3", "rev x=", ["a", "b", "c", "d"], 0, "ai", 0.0, ties=(1, 2))
    assert as_pairs([tied])[1] == [["a", "b"], ["a", "c"], ["a", "d"]]
    assert as_pairs([Comparison(4, "t4", "rev x=", ["a", "b", "c"], 0, "ai", 0.0, ties=(0,))])[1] == \
        [["a", "c"], ["b", "c"]]


def test_retraining_takes_the_new_comparisons_and_replays_as_many_old_pairs(tmp_path):
    from rlhf_ray.feedback.loop import FeedbackLoop
    from rlhf_ray.feedback.store import Comparison

    cfg = compose(["reward=model", "reward.model_path=rm", "feedback.enabled=true", "feedback.replay=1.0"])
    loop = FeedbackLoop(cfg, None, None, ["rev ab="], [[1]], tmp_path)
    old = [Comparison(i, f"t{i}", f"rev {i}=", [f"o{i}", f"p{i}"], 0, "ai", 0.0) for i in range(1, 7)]
    new = [Comparison(i, f"t{i}", f"rev {i}=", [f"n{i}", f"m{i}"], 1, "ai", 0.0) for i in range(7, 9)]
    loop.deployed_through, loop.trained_through = 6, 6
    prompts, pairs = loop.replay_mix(old + new)
    assert pairs[:2] == [["n7", "m7"], ["n8", "m8"]]  # every new pair, first
    assert len(pairs) == 4 and all(p[0].startswith("o") for p in pairs[2:])  # 2 old ones replayed
    assert len(set(prompts)) == 4
    loop.deployed_through = 0  # nothing deployed yet: all are new, none replayed
    assert len(loop.replay_mix(old + new)[1]) == 8
