"""The tiny Llama directory loads and generates in the real vLLM (the CPU build here)."""

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_ray.models import build_tiny_llama, load_tokenizer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture(scope="module")
def vllm_env() -> Iterator[None]:
    # Must be set before vLLM reads its environment: a 1 GiB KV cache is plenty for a
    # tiny model, and the in-process engine needs no __main__ guard and starts faster.
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_tiny_llama_generates_in_vllm(model_dir: Path, vllm_env: None) -> None:
    vllm = pytest.importorskip("vllm")
    tok = load_tokenizer(model_dir)
    prompts = ["rev abc=", "rev hgfedc=", "rev abab="]

    start = time.perf_counter()
    llm = vllm.LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    loaded = time.perf_counter()
    params = vllm.SamplingParams(max_tokens=8, logprobs=0, temperature=1.0, seed=0)
    outputs = llm.generate([{"prompt_token_ids": tok(p)["input_ids"]} for p in prompts], params)
    done = time.perf_counter()
    print(f"\nvLLM engine start {loaded - start:.1f}s, generate {done - loaded:.1f}s")

    assert len(outputs) == len(prompts)
    for out, prompt in zip(outputs, prompts, strict=True):
        assert list(out.prompt_token_ids) == tok(prompt)["input_ids"]
        sample = out.outputs[0]
        ids = list(sample.token_ids)
        assert 1 <= len(ids) <= 8
        assert all(0 <= i < 104 for i in ids)
        # logprobs=0: one dict per generated token holding (at least) the sampled token.
        assert sample.logprobs is not None and len(sample.logprobs) == len(ids)
        for token_id, entry in zip(ids, sample.logprobs, strict=True):
            lp = entry[token_id].logprob
            assert math.isfinite(lp) and lp <= 0.0
        # The text vLLM detokenised is our tokenizer's decoding (no spaces inserted).
        assert sample.text == tok.decode(ids, skip_special_tokens=True)
