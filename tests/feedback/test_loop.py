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
        "trainer.save_every=2"]


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
    assert exact("rev abc=", ["abc", "cba", "cbb"]) == [1, 2, 0]  # gold 1/3, 1, 2/3
    noisy = AILabeler(noise=1.0, seed=1)
    rankings = {tuple(noisy("rev abcd=", ["dcba", "dcbb", "dcaa", "abcd"])) for _ in range(30)}
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
    assert HttpLabeler(judge.url)("p", ["a", "b", "c"]) == [2, 1, 0]
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
