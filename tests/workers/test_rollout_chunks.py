"""Control flow of the rollout worker's asynchronous generation, with a stand-in for vLLM's
``LLM`` (the real engine is exercised by tests/e2e/test_async.py): chunks resubmit the
unfinished prefix, a weight load lands between two chunks and every token records the version
that produced it, and a generate call waits (throttled) until weights recent enough arrive."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from rlhf_ray.config import RolloutConfig
from rlhf_ray.workers.rollout import RolloutWorker, StaleWeightsError


class FakeLLM:
    """Emits token 7 (EOS-free) with logprob -0.5; records every request's prompt length."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.loaded = threading.Event()

    def generate(self, requests, params, use_tqdm=False, lora_request=None):
        self.calls.append([len(r["prompt_token_ids"]) for r in requests])
        time.sleep(0.05)
        outs = []
        for p in params:
            ids = [7] * p.max_tokens
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=ids, logprobs=[{7: SimpleNamespace(logprob=-0.5)} for _ in ids], finish_reason="length")]))
        return outs

    def collective_rpc(self, name, args=()):
        self.loaded.set()

    def reset_prefix_cache(self):
        pass


def worker(max_new_tokens: int = 10) -> RolloutWorker:
    w = object.__new__(RolloutWorker)
    w.name, w.cfg, w.llm, w.version = "rollout-0", RolloutConfig(max_new_tokens=max_new_tokens), FakeLLM(), 0
    w.model_path = ""  # no generation_config: stops come from the config only
    w._engine_lock, w._generate_lock = threading.Lock(), threading.Lock()
    w._versions, w._loads_waiting, w.busy_s = threading.Condition(), 0, 0.0
    return w


def test_chunks_resubmit_the_prefix_and_record_versions_across_a_load():
    w = worker()
    result = {}
    t = threading.Thread(target=lambda: result.update(s=w.generate([[1, 2, 3]], [0], seed=0, min_version=0, n=2,
                                                                    chunk_tokens=4)))
    t.start()
    while not w.llm.calls:  # the first chunk is running
        time.sleep(0.005)
    w.receive_weights([], 1)  # lands between chunks, whole
    t.join()
    samples = result["s"]
    assert len(samples) == 2 and all(len(s.response_ids) == 10 for s in samples)
    # chunks of 4, 4, 2 tokens; each resubmits prompt + the prefix generated so far
    assert w.llm.calls == [[3, 3], [7, 7], [11, 11]]
    for s in samples:
        assert s.token_versions[:4] == [0] * 4 and s.token_versions[4:] == [1] * 6  # spans the update
        assert s.weight_version == 0 and s.finish_reason == "length" and s.logprobs == [-0.5] * 10


def test_whole_generation_is_one_call_with_one_version():
    w = worker()
    samples = w.generate([[1, 2]], [3], seed=0, min_version=0, n=1)
    assert w.llm.calls == [[2]] and samples[0].token_versions == [0] * 10 and samples[0].prompt_index == 3


def test_generate_waits_for_recent_enough_weights():
    w = worker(max_new_tokens=2)
    with pytest.raises(StaleWeightsError):  # synchronous mode: fail at once
        w.generate([[1]], [0], seed=0, min_version=1, n=1)
    threading.Timer(0.2, lambda: w.receive_weights([], 1)).start()
    start = time.monotonic()
    samples = w.generate([[1]], [0], seed=0, min_version=1, n=1, chunk_tokens=1, wait_s=10)
    assert time.monotonic() - start >= 0.15  # throttled until v1 arrived
    assert samples[0].token_versions == [1, 1]
