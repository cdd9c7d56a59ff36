"""Data: the built-in "reverse" task (prompts, noisy demonstrator, gold labeler), its
file generator, and the validated loaders for prompt / SFT / preference files."""

from rlhf_ray.data.datasets import (
    DataError,
    load_comparison_dataset,
    load_prompt_dataset,
    load_sft_dataset,
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
    "DataError",
    "DemonstratorSpec",
    "TaskSpec",
    "corrupt",
    "demonstrate",
    "ensure_task_data",
    "generate_task_data",
    "gold_reward",
    "gold_score",
    "load_comparison_dataset",
    "load_prompt_dataset",
    "load_sft_dataset",
    "make_prompt",
    "rank_completions",
    "reference_answer",
    "tokenize_prompts",
    "tokenize_prompts_with_index",
]
