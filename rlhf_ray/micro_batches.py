"""How a batch is cut into micro-batches for forward/backward passes.

Two ways: fixed ``micro_batch_size`` rows in order, or (``max_tokens_per_micro_batch > 0``)
sequences sorted by length and packed greedily so that each micro-batch's padded size
(rows x (longest prompt + longest response)) stays under a token budget. Either way each
micro-batch's padding is trimmed to its own longest prompt (left-padded) and longest response
(right-padded), keeping the ``Experience`` layout (responses start at column ``P``).
Used by the learners' ``train_on`` and by the inference forward (``workers/forward.batched``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlhf_ray.batch import Experience

SEQUENCE_FIELDS = ("sequences", "attention_mask")  # (B, P + A); every other 2-D field is (B, A)


def lengths(exp: Experience) -> tuple[list[int], list[int]]:
    """Real prompt and response lengths of each row."""
    P = exp.prompt_len
    return exp.attention_mask[:, :P].sum(-1).tolist(), exp.attention_mask[:, P:].sum(-1).tolist()


def fixed_groups(n: int, size: int) -> list[list[int]]:
    """``range(n)`` in consecutive chunks of ``size`` rows."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def token_budget_groups(prompt_lens: list[int], response_lens: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped so that ``len(group) * (max prompt + max response in group) <= max_tokens``.

    Rows are sorted by total length (longest first; ties keep their order) and packed greedily,
    so similar lengths share a micro-batch and little padding remains. A row longer than the
    budget on its own gets a micro-batch of its own (config validation prevents that case).

    Args:
        prompt_lens: real prompt length of each row.
        response_lens: real response length of each row (>= 0).
        max_tokens: padded-token budget per micro-batch, >= 1.

    Returns:
        A partition of ``range(len(prompt_lens))``, each group sorted by row index.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(prompt_lens)), key=lambda i: -(prompt_lens[i] + response_lens[i]))
    groups: list[list[int]] = []
    current: list[int] = []
    p_max = a_max = 0
    for i in order:
        p, a = max(p_max, prompt_lens[i]), max(a_max, max(response_lens[i], 1))
        if current and (len(current) + 1) * (p + a) > max_tokens:
            groups.append(sorted(current))
            current, p, a = [], prompt_lens[i], max(response_lens[i], 1)
        current.append(i)
        p_max, a_max = p, a
    if current:
        groups.append(sorted(current))
    return groups


def trim_padding(exp: Experience) -> Experience:
    """The same rows with padding columns that no row uses removed (left of the prompts, right
    of the responses); model outputs on real tokens do not change (positions come from the mask)."""
    prompt_lens, response_lens = lengths(exp)
    P = exp.prompt_len
    p = max(prompt_lens, default=0)
    a = max(max(response_lens, default=0), 1)
    fields = {}
    for name in exp._tensor_fields():
        t = getattr(exp, name)
        if name in SEQUENCE_FIELDS:
            fields[name] = t[:, P - p : P + a]
        elif t.dim() == 2:
            fields[name] = t[:, :a]
    return replace(exp, **fields)


def plan(exp: Experience, micro_batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """The row groups of :func:`micro_batches` (a token budget when ``max_tokens > 0``)."""
    if max_tokens > 0:
        return token_budget_groups(*lengths(exp), max_tokens)
    return fixed_groups(len(exp), micro_batch_size)


def micro_batches(exp: Experience, micro_batch_size: int, max_tokens: int = 0,
                  min_count: int = 0) -> list[tuple[list[int], Experience]]:
    """``(row indices, trimmed micro-batch)`` pairs covering every row of ``exp`` once, followed by
    empty ``([], one row with valid = 0)`` fillers up to ``min_count`` micro-batches (ranks of one
    DeepSpeed world must run the same number of forward/backward passes)."""
    out = [(g, trim_padding(exp.select(torch.tensor(g, device=exp.sequences.device))))
           for g in plan(exp, micro_batch_size, max_tokens)]
    while len(out) < min_count:
        out.append(([], empty_like(out[0][1] if out else exp)))
    return out


def empty_like(exp: Experience) -> Experience:
    """One row of ``exp`` that counts nowhere (``valid = 0``): a filler micro-batch."""
    one = exp.select(slice(0, 1))
    return replace(one, valid=torch.zeros(1, device=one.sequences.device))


def scatter_rows(parts: list[tuple[list[int], torch.Tensor]], n: int, width: int) -> torch.Tensor:
    """Reassemble per-micro-batch ``(b_i, a_i)`` outputs into ``(n, width)`` rows, zero-padded right."""
    out = None
    for rows, t in parts:
        if not rows:  # a filler
            continue
        if out is None:
            out = torch.zeros((n, width), dtype=t.dtype)
        out[torch.tensor(rows), : t.shape[1]] = t.cpu()
    return out if out is not None else torch.zeros((n, width))
