"""Forward passes shared by the policy, reference and critic workers: response-token
logprobs and values of an ``Experience`` layout, in (trimmed, optionally token-budget) micro-batches;
for inference, optionally each distinct prompt once (``shared_prompt_logits``)."""

from __future__ import annotations

import torch

from rlhf_ray.algo import entropy_from_logits, logprobs_from_logits
from rlhf_ray.batch import Experience, position_ids
from rlhf_ray.micro_batches import micro_batches, scatter_rows


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, A: int, temperature: float,
                    share_prompts: bool = False):
    """Logits (B, A, V) that predict the A response tokens (positions P-1 .. P+A-2);
    ``share_prompts``: see :func:`shared_prompt_logits` (inference only)."""
    logits = shared_prompt_logits(model, sequences, attention_mask, A) if share_prompts else None
    if logits is None:
        out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
        logits = out.logits[:, -A - 1 : -1]
    return logits.float() / temperature


def prefix_once(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor):
    """Run the left-padded prefixes ``ids`` once with a key/value cache; returns the output and
    the cache with prefix ``rows[i]``'s keys and values as row i, for the rows' own tokens to run
    on. ``None`` when the model keeps no Hugging Face ``Cache`` (the caller runs the full forward)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(rows)
    return out, cache


def shared_prompt_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, A: int) -> torch.Tensor | None:
    """The logits of :func:`response_logits` with each distinct prompt run once: rows that share
    a prompt (the samples of one prompt in GRPO/RLOO) take its key/value cache, and only their
    responses run on top of it. The same numbers as the full forward up to float rounding
    (attention over the same keys, the same positions), for ``n`` samples per prompt about
    ``(n - 1) / n`` of the prompt tokens' work less. With autograd the prompt's activations are
    shared too: its samples' gradients add up in them, as in the full forward. ``None`` (run the
    full forward) when no two rows share a prompt or the model keeps no Hugging Face ``Cache``:
    the number of forward calls depends on the data, so ZeRO-3 ranks (which gather parameters
    collectively in every call) must not use it."""
    P = sequences.shape[1] - A
    if P < 1:
        return None
    # left-padded prompts: the same ids and mask = the same prompt (a pad id inside a prompt stays apart)
    prompts, inverse = torch.unique(torch.cat([sequences[:, :P], attention_mask[:, :P]], 1), dim=0,
                                    return_inverse=True)
    if len(prompts) == len(sequences):
        return None
    ran = prefix_once(model, prompts[:, :P], prompts[:, P:], inverse)
    if ran is None:
        return None
    out, cache = ran
    first = out.logits[:, -1:][inverse]  # the last prompt token predicts the first response token
    if A == 1:
        return first
    rest = model(input_ids=sequences[:, P:-1], attention_mask=attention_mask[:, :-1],
                 position_ids=position_ids(attention_mask)[:, P:-1], past_key_values=cache, use_cache=True)
    return torch.cat([first, rest.logits], 1)


def response_logprobs(
    model, sequences: torch.Tensor, attention_mask: torch.Tensor, A: int, temperature: float = 1.0,
    with_entropy: bool = False, share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, A) logprobs of the response tokens, and (B, A) entropies when asked
    (``share_prompts``: :func:`shared_prompt_logits`)."""
    logits = response_logits(model, sequences, attention_mask, A, temperature, share_prompts)
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


def shared_prefix_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor | None:
    """(N,) scores of a sequence classifier (``model.base_model`` + its ``score`` head) on N = B x k
    right-padded rows, ``k`` per group (a ranking's completions of one prompt), with each group's
    common token prefix run once and its rows' remaining tokens run on that prefix's key/value
    cache; each row is scored at its last real token, as the classifier's own forward does. The
    same numbers as the full forward up to float rounding, with autograd too (the prefix's
    activations collect its rows' gradients). ``None`` (run the full forward) when the model has
    no ``score`` head or keeps no Hugging Face ``Cache``, or a group's rows share no first token.
    The number of forward calls is fixed (two), but ZeRO-3 callers keep the plain forward."""
    base, head = getattr(model, "base_model", None), getattr(model, "score", None)
    if base is None or base is model or not isinstance(head, torch.nn.Module) or k < 2:
        return None
    n, t = input_ids.shape
    ids, mask = input_ids.view(-1, k, t), attention_mask.view(-1, k, t).bool()
    lengths = mask.sum(-1)  # (B, k)
    agree = ((ids == ids[:, :1]) & mask).all(1)  # (B, t): every row of the group has this real token
    common = torch.minimum(agree.long().cumprod(-1).sum(-1), lengths.min(1).values - 1)  # each row keeps >= 1 own token
    if bool((common < 1).any()):
        return None
    b, P, A = len(common), int(common.max()), int((lengths - common[:, None]).max())
    prefix, prefix_mask = ids.new_zeros(b, P), ids.new_zeros(b, P)  # left-padded
    rest, rest_mask = ids.new_zeros(n, A), ids.new_zeros(n, A)  # right-padded
    for i, c in enumerate(common.tolist()):
        prefix[i, P - c:], prefix_mask[i, P - c:] = ids[i, 0, :c], 1
        for j in range(k):
            m = int(lengths[i, j]) - c
            rest[i * k + j, :m], rest_mask[i * k + j, :m] = ids[i, j, c : c + m], 1
    ran = prefix_once(base, prefix, prefix_mask, torch.arange(b, device=ids.device).repeat_interleave(k))
    if ran is None:
        return None
    _, cache = ran
    full = torch.cat([prefix_mask.repeat_interleave(k, 0), rest_mask], 1)
    hidden = base(input_ids=rest, attention_mask=full, position_ids=position_ids(full)[:, P:], past_key_values=cache,
                  use_cache=True).last_hidden_state
    last = hidden[torch.arange(n, device=ids.device), rest_mask.sum(-1) - 1]  # (N, H): each row's last real token
    return head(last)[:, 0]
