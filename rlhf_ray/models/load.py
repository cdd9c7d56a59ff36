"""Every model and tokenizer load of the project goes through here.

The built-in tiny Llama and real Hugging Face checkpoints (a Llama or Qwen
directory) load through the same functions:

* :func:`load_tokenizer`: pad token falls back to EOS when the tokenizer has none;
* :func:`load_causal_lm`: policy / reference;
* :func:`load_value_model`: critic, a token classifier with one output per token;
* :func:`load_reward_model`: a sequence classifier scored at the last non-pad token;
* :func:`check_tokenizer_matches_model`: fail early on a tokenizer/model mismatch;
* :func:`check_model_dir`: fail early, naming the path, when a directory holds no model.

Safety rules (users rely on them): weights are read from safetensors only
(``use_safetensors=True``, so a pickle ``.bin`` is never unpickled) and
``trust_remote_code`` is passed as given, default False, so no code from a
checkpoint directory runs unless the user asks for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

PathLike = str | os.PathLike[str]
Dtype = torch.dtype | str


class ModelDirError(ValueError):
    """A model path that holds no usable model; the message names the path and what is missing."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(path: PathLike, role: str, *, tokenizer: bool = False) -> None:
    """Fail with :class:`ModelDirError` naming ``role`` and ``path`` when a local path is not a
    model directory: missing, a file, or without ``config.json`` / safetensors weights (and
    tokenizer files when ``tokenizer``). A name that is not a local path (``org/name``) is left
    to Hugging Face. Called before any worker starts, so that the error is this one and not a
    tokenizer converter's or a worker's."""
    text, p = str(path), Path(path)
    if not p.exists():
        if p.is_absolute() or text.startswith(("./", "../", "~")) or text.count("/") != 1:
            raise ModelDirError(f"{role}: {text}: no such model directory")
        return  # a Hugging Face hub name
    if not p.is_dir():
        raise ModelDirError(f"{role}: {text} is a file; expected a model directory (config.json + *.safetensors)")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any(p.glob("*.safetensors")):
        pickles = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        missing.append("*.safetensors weights" + (f" (found {pickles}: pickle weights are not loaded; "
                                                  "convert them to safetensors)" if pickles else ""))
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (" + ", ".join(TOKENIZER_FILES) + ")")
    if len(missing) >= 2 and "config.json" in missing:
        raise ModelDirError(f"{role}: {text} holds no model (no {', no '.join(missing)})")
    if missing:
        raise ModelDirError(f"{role}: {text} is not a complete model directory: no {', no '.join(missing)}")


def _require_safetensors(path: PathLike) -> None:
    """Clear error for a local directory that only has pickle weights (we never load those)."""
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")):
        found = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {found}: pickle weights are not loaded; convert them to safetensors)" if found else ""
        )
        raise ModelDirError(f"{p}: no .safetensors weights{hint}")


def load_tokenizer(path: PathLike, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved at ``path``; its pad token is set to EOS if it has none."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{path}: tokenizer has neither a pad token nor an EOS token to use as pad")
        # Batches need a pad id; EOS is the usual stand-in (pads are masked out anyway).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: PathLike, *, dtype: Dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A causal LM (policy or reference) from a safetensors checkpoint."""
    _require_safetensors(path)
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def _head_parameter_names(model: PreTrainedModel) -> list[str]:
    """Names of the parameters outside the backbone (the classification head)."""
    prefix = model.base_model_prefix + "."
    return [name for name, _ in model.named_parameters() if not name.startswith(prefix)]


def load_value_model(
    path: PathLike, *, dtype: Dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Critic: ``AutoModelForTokenClassification`` with one label; ``.logits`` is ``(b, t, 1)``.

    The backbone comes from a causal-LM, sequence-classifier or earlier critic
    checkpoint. Head weights found in the checkpoint are used (a one-label
    reward model's ``score.weight`` carries over, as InstructGPT initialises the
    value function from the reward model); head parameters that are missing
    are set to ZERO. Why zeros rather than OpenRLHF's N(0, 1/(h+1)): the
    critic starts at V = 0 everywhere, so the first advantages are plain
    returns without random value noise; the head still gets a gradient at
    once (dV/dw = hidden state), only the backbone's waits for one update.
    Dropout before the head is turned off: it would make value estimates
    noisy and differ between experience collection (eval) and training.
    """
    _require_safetensors(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    model, info = AutoModelForTokenClassification.from_pretrained(
        str(path),
        config=config,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    missing = set(info["missing_keys"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in _head_parameter_names(model):
            if name in missing:
                params[name].zero_()
    return model


def _pad_token_id_for(path: PathLike, config: PretrainedConfig, trust_remote_code: bool) -> int | None:
    """Pad id for a sequence classifier: the config's, else the tokenizer's (pad, else EOS)."""
    if config.pad_token_id is not None:
        return config.pad_token_id
    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code).pad_token_id
    except (OSError, ValueError):
        eos = config.eos_token_id  # no tokenizer saved with the weights
        return eos[0] if isinstance(eos, list) else eos


def load_reward_model(
    path: PathLike, *, dtype: Dtype = torch.float32, trust_remote_code: bool = False, num_labels: int = 1
) -> PreTrainedModel:
    """Reward model: ``AutoModelForSequenceClassification``; ``.logits`` is ``(b, num_labels)``.

    HF reads the score at the rightmost token that is not ``config.pad_token_id``
    (left or right padding), so the pad id is always set here. From a causal-LM
    checkpoint the head is new (HF's normal init, std ``initializer_range``):
    that is how reward-model training starts. Note: when pad == EOS, a trailing
    EOS counts as padding and the score is read at the token before it.
    """
    _require_safetensors(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    config.num_labels = num_labels
    config.pad_token_id = _pad_token_id_for(path, config, trust_remote_code)
    if config.pad_token_id is None:
        raise ValueError(
            f"{path}: no pad or EOS token id in the config or tokenizer; a reward model needs one"
        )
    return AutoModelForSequenceClassification.from_pretrained(
        str(path), config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def _vocab_rows(model_config: PretrainedConfig) -> int:
    # Multimodal configs keep the language model's numbers in a text sub-config.
    text_config: Any = model_config.get_text_config()
    return int(text_config.vocab_size)


def check_tokenizer_matches_model(
    tokenizer: PreTrainedTokenizerBase, model_config: PretrainedConfig, where: str
) -> None:
    """ValueError naming both paths if the tokenizer can produce ids the model has no rows for.

    Checks: every token id (including added tokens) < the model's
    ``vocab_size``, and pad / EOS ids are set and in range. ``where`` says
    which role is being checked (e.g. "policy").
    """
    rows = _vocab_rows(model_config)
    names = (
        f"tokenizer {getattr(tokenizer, 'name_or_path', '?') or '?'} "
        f"and model {getattr(model_config, '_name_or_path', '?') or '?'}"
    )
    problems: list[str] = []
    max_id = max(tokenizer.get_vocab().values(), default=-1)
    if max_id >= rows:
        problems.append(f"tokenizer ids go up to {max_id} but the model has {rows} embedding rows")
    for label in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, label, None)
        if value is None:
            problems.append(f"tokenizer has no {label}")
        elif not 0 <= value < rows:
            problems.append(f"tokenizer {label}={value} is outside the model's {rows} embedding rows")
    if problems:
        raise ModelDirError(f"{where}: {names} do not match: " + "; ".join(problems))
