"""Checks that a trained model directory is something users can serve as it is: plain
``from_pretrained`` loads (no project code), the tokenizer with its chat template, the
generation config, and for policies a ``vllm.LLM`` that agrees with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

CHAT = [{"role": "user", "content": "rev abc="}]


def assert_causal_lm_export(path: Path, with_vllm: bool = True) -> None:
    """``path`` loads with AutoModelForCausalLM + AutoTokenizer (chat template included) and,
    when asked, with ``vllm.LLM``, whose logprobs of a chat prompt's continuation match HF's."""
    files = {p.name for p in Path(path).iterdir()}
    needed = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja"}
    assert needed <= files, f"{path}: missing {needed - files}"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id is not None
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    seq = out[0].tolist()
    if not with_vllm:
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    llm = vllm.LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=64, seed=0)
    try:
        scored = llm.generate([{"prompt_token_ids": seq}], vllm.SamplingParams(max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)[0]
        vllm_lp = torch.tensor([lp[t].logprob for lp, t in zip(scored.prompt_logprobs[1:], seq[1:], strict=True)])
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
        hf_lp = logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        assert (vllm_lp - hf_lp).abs().max() < 1e-4, (vllm_lp, hf_lp)
    finally:
        del llm


def assert_reward_model_export(path: Path) -> None:
    """``path`` loads with AutoModelForSequenceClassification (tokenizer with its chat template)
    and scores chat-rendered (prompt, completion) pairs exactly as the reward worker does: each
    text alone (no padding) and as a padded batch, against ``RewardWorker.score``."""
    from rlhf_ray.config import RewardConfig
    from rlhf_ray.workers.reward import RewardWorker

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    completions = ["cba", "c", "cbaxyz", "abc"]  # different lengths: the batch is padded
    texts = [prompt + c for c in completions]
    with torch.no_grad():
        alone = [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
        batch = tok(texts, return_tensors="pt", padding=True)
        batched = model(**batch).logits
    assert batched.shape == (len(texts), 1)
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:  # the worker class itself, without Ray (it pins this process's threads: restored below)
        worker = RewardWorker("reward-export", RewardConfig(kind="model", model_path=str(path), gold_function=""))
        scores = worker.score([prompt] * len(completions), completions)["reward"]
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    assert len(set(alone)) > 1, alone  # a trained head tells these completions apart
    assert torch.allclose(torch.tensor(scores), torch.tensor(alone), atol=1e-5), (scores, alone)
    assert torch.allclose(batched[:, 0], torch.tensor(alone), atol=1e-5), (batched, alone)
