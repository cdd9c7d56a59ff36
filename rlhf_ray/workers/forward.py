"""Forward passes shared by the policy, reference and critic workers: response-token
logprobs and values of an ``Experience`` layout, in (trimmed, optionally token-budget) micro-batches."""

from __future__ import annotations

import torch

from rlhf_ray.algo import entropy_from_logits, logprobs_from_logits
from rlhf_ray.batch import Experience, position_ids
from rlhf_ray.micro_batches import micro_batches, scatter_rows


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
def batched(fn, exp: Experience, micro_batch_size: int, max_tokens: int = 0, min_count: int = 0) -> torch.Tensor:
    """Apply ``fn(sequences, attention_mask, A) -> (b, A)`` to trimmed micro-batches of ``exp``
    (fixed rows, or a token budget: ``micro_batches.micro_batches``; at least ``min_count``
    calls, for ZeRO-3 ranks that must run as many forwards as their peers); returns ``(B, A)``
    on CPU in ``exp``'s row order, zero beyond each micro-batch's trimmed width."""
    parts = [
        (rows, fn(mb.sequences, mb.attention_mask, mb.response_mask.shape[1]))
        for rows, mb in micro_batches(exp, micro_batch_size, max_tokens, min_count)
    ]
    return scatter_rows(parts, len(exp), exp.response_mask.shape[1])
