"""Data: the built-in "reverse" task (prompts, noisy demonstrator, gold labeler), its
file generator, the validated loaders for prompt / SFT / preference data (files, saved
datasets, ``hf:`` datasets), and chat rendering with the tokenizer's template."""

from rlhf_ray.data.chat import ChatError, encode_conversation, prompt_token_ids, render_prompt
from rlhf_ray.data.datasets import (
    DataError,
    load_comparison_dataset,
    load_prompt_dataset,
    load_sft_dataset,
    prompt_inputs,
    tokenize_prompts,
    tokenize_prompts_with_index,
)
from rlhf_ray.data.generate import ensure_task_data, generate_task_data
from rlhf_ray.data.task import (
    DemonstratorSpec,
    TaskSpec,
    corrupt,
    demonstrate,
    gold_reward,
    gold_score,
    make_prompt,
    rank_completions,
    reference_answer,
)

__all__ = [
    "ChatError",
    "DataError",
    "DemonstratorSpec",
    "TaskSpec",
    "corrupt",
    "demonstrate",
    "encode_conversation",
    "ensure_task_data",
    "generate_task_data",
    "gold_reward",
    "gold_score",
    "load_comparison_dataset",
    "load_prompt_dataset",
    "load_sft_dataset",
    "make_prompt",
    "prompt_inputs",
    "prompt_token_ids",
    "rank_completions",
    "reference_answer",
    "render_prompt",
    "tokenize_prompts",
    "tokenize_prompts_with_index",
]
