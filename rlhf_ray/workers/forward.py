"""Forward passes shared by the policy, reference and critic workers: response-token
logprobs and values of an ``Experience`` layout, in micro-batches."""

from __future__ import annotations

import torch

from rlhf_ray.algo import entropy_from_logits, logprobs_from_logits
from rlhf_ray.batch import position_ids


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, A: int, temperature: float):
    """Logits (B, A, V) that predict the A response tokens (positions P-1 .. P+A-2)."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits[:, -A - 1 : -1].float() / temperature


def response_logprobs(
    model, sequences: torch.Tensor, attention_mask: torch.Tensor, A: int, temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, A) logprobs of the response tokens, and (B, A) entropies when asked."""
    logits = response_logits(model, sequences, attention_mask, A, temperature)
    logprobs = logprobs_from_logits(logits, sequences[:, -A:])
    return logprobs, (entropy_from_logits(logits) if with_entropy else None)


def response_values(model, sequences: torch.Tensor, attention_mask: torch.Tensor, A: int) -> torch.Tensor:
    """(B, A) value of the state before each response token (token-classification head)."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits[:, -A - 1 : -1, 0].float()


@torch.no_grad()
def batched(fn, sequences: torch.Tensor, attention_mask: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """Apply ``fn(sequences, attention_mask) -> (b, A)`` in micro-batches; concatenate on CPU."""
    chunks = [
        fn(sequences[i : i + micro_batch_size], attention_mask[i : i + micro_batch_size]).cpu()
        for i in range(0, sequences.shape[0], micro_batch_size)
    ]
    return torch.cat(chunks)
