"""Reward workers without Ray: the rule kind, shape checks, and the HTTP kind against a real
server on loopback (auth header, retry on 5xx, no retry on 4xx, requests of reward.batch_size
completions with reward.max_concurrency in flight, a bad answer naming its request)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf_ray.config import RewardConfig
from rlhf_ray.workers.reward import RewardShapeError, RewardWorker, check_rewards


class RewardServer:
    """Scores len(completion); fails the first ``fail_first`` requests with 503; answers
    ``delay_s`` late; records each request's size and the most requests seen in flight at once;
    drops the last reward of a request whose first completion is ``"short"``."""

    def __init__(self, token: str = "", fail_first: int = 0, delay_s: float = 0.0):
        self.token, self.fail_first, self.requests, self.delay_s = token, fail_first, 0, delay_s
        self.sizes: list[int] = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                with lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    number = outer.requests
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    outer.sizes.append(len(body["completions"]))
                    time.sleep(outer.delay_s)
                    if outer.token and self.headers.get("Authorization") != f"Bearer {outer.token}":
                        return self._send(401, {"error": "unauthorized"})
                    if number <= outer.fail_first:
                        return self._send(503, {"error": "busy"})
                    rewards = [float(len(c)) for c in body["completions"]]
                    return self._send(200, {"rewards": rewards[:-1] if body["completions"][0] == "short" else rewards})
                finally:
                    with lock:
                        outer.in_flight -= 1

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = RewardServer(token="t0k3n", fail_first=1)
    yield s
    s.close()


def test_function_reward_is_the_task_rule():
    w = RewardWorker("reward-0", RewardConfig())
    # reference answers "cba" and "dcba"; per-position matches / max(len(reference), len(completion)):
    # "cba" 3/3, "abc" only the middle 1/3, "dcxa" 3/4, "dcbaZZ" 4/6, "" 0
    prompts = ["rev abc=", "rev abc=", "rev abcd=", "rev abcd=", "rev abcd="]
    out = w.score(prompts, ["cba", "abc", "dcxa", "dcbaZZ", ""])
    expected = [1.0, 1 / 3, 0.75, 4 / 6, 0.0]
    assert out["reward"] == pytest.approx(expected) and out["gold"] == pytest.approx(expected)


def test_http_reward_with_token_and_retry(server, monkeypatch):
    monkeypatch.setenv("MY_REWARD_TOKEN", "t0k3n")
    cfg = RewardConfig(kind="http", url=server.url, token_env="MY_REWARD_TOKEN", retries=3, gold_function="")
    w = RewardWorker("reward-0", cfg)
    assert w.score(["p", "q"], ["ab", "abcd"]) == {"reward": [2.0, 4.0]}
    assert server.requests == 2  # one 503, then success
    assert "t0k3n" not in repr(w) and "t0k3n" not in repr(w.cfg)


def test_http_reward_bad_token_fails_fast(server, monkeypatch):
    monkeypatch.setenv("MY_REWARD_TOKEN", "wrong")
    cfg = RewardConfig(kind="http", url=server.url, token_env="MY_REWARD_TOKEN", retries=3, gold_function="")
    with pytest.raises(RuntimeError, match="401"):
        RewardWorker("reward-0", cfg).score(["p"], ["x"])
    assert server.requests == 1  # 4xx is not retried


def test_http_reward_batches_requests_with_bounded_concurrency():
    """10 completions, 2 per request, 3 requests in flight: 5 requests of 0.3 s answered in two
    waves (~0.6 s, not 1.5 s), never more than 3 at once, rewards in the order of the input."""
    s = RewardServer(delay_s=0.3)
    try:
        cfg = RewardConfig(kind="http", url=s.url, batch_size=2, max_concurrency=3, gold_function="")
        w = RewardWorker("reward-0", cfg)
        completions = ["a" * i for i in range(10)]
        start = time.perf_counter()
        assert w.score(["p"] * 10, completions) == {"reward": [float(i) for i in range(10)]}
        elapsed = time.perf_counter() - start
        assert sorted(s.sizes) == [2] * 5 and s.max_in_flight == 3
        assert 0.55 < elapsed < 1.4  # 2 waves of 0.3 s (5 sequential requests would take 1.5 s)
    finally:
        s.close()


def test_http_reward_wrong_count_names_the_request():
    s = RewardServer()
    try:
        cfg = RewardConfig(kind="http", url=s.url, batch_size=2, max_concurrency=2, gold_function="")
        with pytest.raises(RewardShapeError, match=r"request 2/3 \(completions 2\.\.3\)"):
            RewardWorker("reward-0", cfg).score(["p"] * 5, ["ok", "ok", "short", "x", "y"])
    finally:
        s.close()


def test_missing_token_env_is_named(monkeypatch):
    monkeypatch.delenv("NOT_SET_TOKEN", raising=False)
    with pytest.raises(ValueError, match="NOT_SET_TOKEN"):
        RewardWorker("reward-0", RewardConfig(kind="http", url="http://127.0.0.1:1/x", token_env="NOT_SET_TOKEN"))


def test_wrong_shape_names_the_source():
    with pytest.raises(RewardShapeError, match="reward-3"):
        check_rewards([1.0], 2, "reward-3 (function reward)")
    with pytest.raises(RewardShapeError, match="non-numeric"):
        check_rewards(["a", 1.0], 2, "reward-3")
    assert check_rewards([float("nan"), 1], 2, "x")[1] == 1.0
