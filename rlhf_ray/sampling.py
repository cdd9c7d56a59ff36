"""The one place vLLM ``SamplingParams`` of a rollout are built, and where stop conditions come from.

A completion stops at (a) any EOS id of the model's ``generation_config.json`` (chat models
list several: Llama 3 ``<|eot_id|>`` and ``<|end_of_text|>``, Qwen ``<|im_end|>`` and
``<|endoftext|>``), (b) the ids in ``rollout.stop_token_ids``, (c) the strings in
``rollout.stop`` (matched on the decoded text; the token ids generated up to and including the
match are what the learner trains on: ids are never cut back through text), or (d)
``rollout.max_new_tokens``. vLLM would also read (a) itself; it is passed explicitly so that the
same stops hold on every engine build and are visible in one place.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlhf_ray.config import RolloutConfig


@lru_cache(maxsize=16)
def generation_eos_ids(model_path: str) -> tuple[int, ...]:
    """EOS ids listed in ``model_path/generation_config.json`` (falling back to ``config.json``);
    empty when neither names one."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_path) / name
        if not path.is_file():
            continue
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if eos is not None:
            return tuple(sorted({eos} if isinstance(eos, int) else {int(i) for i in eos}))
    return ()


def stop_token_ids(cfg: RolloutConfig, model_path: str) -> list[int]:
    """Every token id a completion stops at: the model's EOS ids plus ``cfg.stop_token_ids``."""
    return sorted(set(generation_eos_ids(str(model_path))) | set(cfg.stop_token_ids))


def sampling_params(cfg: RolloutConfig, model_path: str, *, seed: int, n: int | None = None,
                    max_tokens: int | None = None) -> Any:
    """vLLM ``SamplingParams`` of one prompt's ``n`` (default ``cfg.n_samples_per_prompt``)
    samples (``max_tokens``: a chunk of an asynchronous rollout, default ``cfg.max_new_tokens``):
    temperature/top-p of ``cfg``, the behaviour logprob of each sampled token (after
    temperature / top-p, see the engine's ``logprobs_mode``), and the stops above. The engine
    detokenizes only to match stop strings: the trainer reads token ids and decodes them itself,
    and the per-step incremental detokenization (and decoding of every logprob's token) is a
    fixed cost of each decode step."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n or cfg.n_samples_per_prompt,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=max_tokens or cfg.max_new_tokens,
        logprobs=0,
        seed=seed,
        stop_token_ids=stop_token_ids(cfg, model_path),
        stop=list(cfg.stop) or None,
        detokenize=bool(cfg.stop),
    )
