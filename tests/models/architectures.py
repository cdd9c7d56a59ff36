"""The tiny configs of every architecture the stack supports, for the tests that run them all
(``tests/models/test_architectures.py`` through DeepSpeed and vLLM, ``tests/workers/test_forward.py``
in process): GQA where the architecture has it; Qwen2 and Gemma tie the output layer to the
embeddings, Qwen2 has q/k/v biases, GPT-NeoX fuses q/k/v with biases and partial rotary, Phi-3
fuses qkv and gate/up. Head size 32 where it is set: vLLM's CPU attention takes 32, 64, 80, ..."""

from __future__ import annotations

from collections.abc import Callable

import transformers as T


def architecture_configs(**common) -> dict[str, Callable[[], T.PretrainedConfig]]:
    """A config factory per architecture; ``common`` = the sizes and special token ids all share."""
    return {
        "llama": lambda: T.LlamaConfig(num_key_value_heads=1, **common),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common),
        "qwen3": lambda: T.Qwen3Config(num_key_value_heads=1, head_dim=32, **common),
        "mistral": lambda: T.MistralConfig(num_key_value_heads=1, head_dim=32, **common),
        "gemma": lambda: T.GemmaConfig(num_key_value_heads=1, head_dim=32, **common),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "phi3": lambda: T.Phi3Config(num_key_value_heads=2, **common),
    }
