"""Builds the tiny random-init Llama (+ character tokenizer) the built-in task trains.

Nothing can be downloaded, so the default policy is made here: a
``LlamaForCausalLM`` from a small ``LlamaConfig``, random-initialised from a
seed, saved as a normal Hugging Face model directory (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) that transformers and vLLM load like any
checkpoint. With the defaults it has about 2.4 M parameters.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from rlhf_ray.models.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer

VOCAB_MULTIPLE = 8  # embedding rows rounded up to a multiple of 8 (friendlier matmul shapes)


def tiny_llama_config(
    vocab_size: int,
    *,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    hidden_size: int = 192,
    num_layers: int = 4,
    num_heads: int = 3,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
) -> LlamaConfig:
    """The ``LlamaConfig`` of :func:`build_tiny_llama` (vocab rounded up to a multiple of 8)."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    return LlamaConfig(
        vocab_size=-(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        # 4x is the classic transformer MLP ratio; plenty for the toy task and cheap on CPU.
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        # Untied: the policy's output layer and embeddings are separate weights, as in
        # most Llama checkpoints; weight sync and value/reward heads stay simple.
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        dtype="float32",
    )


def build_tiny_llama(
    out_dir: str | os.PathLike[str],
    *,
    hidden_size: int = 192,
    num_layers: int = 4,
    num_heads: int = 3,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    seed: int = 0,
    alphabet: str = DEFAULT_ALPHABET,
) -> Path:
    """Build, save and return ``out_dir`` (files of an earlier build there are replaced).

    Deterministic given ``seed``: the global torch RNG is forked, so callers'
    random state is left untouched. Files are written into a temporary sibling
    directory and moved in with ``config.json`` last, so a crash mid-build never
    leaves a directory that :func:`ensure_tiny_llama` would take as complete.
    """
    tokenizer = build_char_tokenizer(alphabet)
    config = tiny_llama_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    return build_tiny_model(out_dir, config, tokenizer, seed=seed)


def build_tiny_model(
    out_dir: str | os.PathLike[str], config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, *,
    seed: int = 0, eos_token_ids: list[int] | None = None,
) -> Path:
    """A random-init causal LM of any architecture ``config`` names (``AutoModelForCausalLM``),
    saved with ``tokenizer`` into ``out_dir`` (safetensors, atomically: ``config.json`` last).
    ``eos_token_ids`` (default: the tokenizer's EOS) go into ``generation_config.json``."""
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch.float32)
    # Sampling defaults are the rollout config's business; the file only has to agree
    # with the tokenizer on the special ids (vLLM and HF generate read it).
    eos = eos_token_ids or tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        model.save_pretrained(tmp)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(tmp)
        out.mkdir(exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            # Some writers create files 0600 via temp files; the directory is meant to be shared
            # (Ray workers, vLLM, other users of a cache volume).
            os.chmod(tmp / name, 0o644)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_current_build(out_dir: str | os.PathLike[str]) -> bool:
    """Whether ``out_dir`` holds a complete build of this version (a tokenizer with the chat
    template: caches built before the template existed are not)."""
    out = Path(out_dir)
    return (out / "config.json").is_file() and (out / "chat_template.jinja").is_file()


def ensure_tiny_llama(out_dir: str | os.PathLike[str], **kwargs: object) -> Path:
    """Build the tiny Llama into ``out_dir`` unless a current build is already there (an older
    build, e.g. one without a chat template, is rebuilt in place)."""
    out = Path(out_dir)
    if not is_current_build(out):
        build_tiny_llama(out, **kwargs)  # type: ignore[arg-type]
    return out
