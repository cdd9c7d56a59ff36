"""Models and tokenizers: the built-in tiny Llama + character tokenizer, and the loaders
every role (policy, reference, critic, reward) goes through."""

from rlhf_ray.models.build import build_tiny_llama, ensure_tiny_llama, tiny_llama_config
from rlhf_ray.models.load import (
    ModelDirError,
    check_model_dir,
    check_tokenizer_matches_model,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
)
from rlhf_ray.models.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer

__all__ = [
    "ModelDirError",
    "check_model_dir",
    "DEFAULT_ALPHABET",
    "build_char_tokenizer",
    "build_tiny_llama",
    "check_tokenizer_matches_model",
    "ensure_tiny_llama",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "load_value_model",
    "tiny_llama_config",
]
