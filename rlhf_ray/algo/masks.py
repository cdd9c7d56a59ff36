"""Masked reductions over padded token tensors: sums, means, variance, whitening, loss aggregation.

Owns how padding is ignored. Every other module in ``rlhf_ray.algo`` reduces through these
functions so that "masked positions never change a result" is implemented (and tested) once.

Masks are 0/1 (bool or numeric) tensors broadcastable to ``x``. Masked-out positions are
*selected away* (``torch.where``), not multiplied by zero, so a NaN or inf sitting in padding
(e.g. a log-probability of a pad token) cannot leak into a result.

Reference: torchtune ``torchtune/rlhf/rewards.py`` (``masked_mean``, ``masked_var``, ``whiten``)
and OpenRLHF ``openrlhf/models/utils.py`` (``masked_mean``, ``masked_normalize``).
"""

from __future__ import annotations

import torch

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming the arguments if the given tensors do not all have the same shape.

    Guards against silent broadcasting, e.g. ``(b,)`` scores against ``(b, a)`` logprobs.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {detail}")


def _select(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x with masked-out positions set to 0, bool mask expanded to x's shape)``."""
    keep = mask.bool().expand_as(x)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), keep


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is set.

    Args:
        x: any shape, e.g. ``(b, a)``.
        mask: 0/1 or bool, broadcastable to ``x``.
        dim: dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        ``()`` if ``dim`` is None, else ``x.shape`` without ``dim`` (e.g. ``(b,)`` for ``dim=-1``).
    """
    selected, _ = _select(x, mask)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set; 0 (not NaN) where nothing is selected.

    Source: torchtune ``rlhf/rewards.py::masked_mean`` (``(x * mask).sum() / mask.sum()``), made
    safe for empty masks: an all-padding row contributes no signal, so its mean is 0.

    Args:
        x: any shape, e.g. ``(b, a)``.
        mask: 0/1 or bool, broadcastable to ``x``.
        dim: dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        ``()`` if ``dim`` is None, else ``x.shape`` without ``dim``.
    """
    selected, keep = _select(x, mask)
    if dim is None:
        total, count = selected.sum(), keep.sum()
    else:
        total, count = selected.sum(dim=dim), keep.sum(dim=dim)
    # count is an integer count, so clamp(min=1) only changes the empty case (0 / 1 = 0).
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all positions where ``mask`` is set (a scalar).

    Source: torchtune ``rlhf/rewards.py::masked_var`` / OpenRLHF ``masked_normalize``:
    ``mean((x - mean)^2)``, times Bessel's correction ``n / (n - 1)`` if ``unbiased``.
    With fewer than two selected elements the correction is undefined and is skipped
    (the result is then 0) rather than returning inf/NaN.

    Args:
        x: any shape, e.g. ``(b, a)``.
        mask: 0/1 or bool, broadcastable to ``x``.

    Returns:
        ``()``.
    """
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered.pow(2), mask)
    if unbiased:
        count = mask.bool().expand_as(x).sum().to(var.dtype)
        var = var * torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalize ``x`` to zero mean and unit variance using statistics of the valid positions only.

    Source: torchtune ``rlhf/rewards.py::whiten`` and lm-human-preferences ``whiten``:
    ``(x - mean) * rsqrt(var + eps)``; if not ``shift_mean`` the mean is added back
    (scale only). Uses the unbiased variance, as both references do.

    Args:
        x: ``(b, a)`` (any shape works).
        mask: 0/1 or bool, broadcastable to ``x``.

    Returns:
        Same shape as ``x``; masked-out positions are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)[0]


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss ``(b, a)`` to a scalar, ignoring masked positions.

    Modes (names as in veRL ``core_algos.agg_loss``):
        - ``token_mean``: mean over all valid tokens of the batch (OpenRLHF, CleanRL-style PPO;
          long responses weigh more).
        - ``seq_mean_token_mean``: mean over each row's valid tokens, then mean over rows
          (the original GRPO objective, Shao et al. 2024 eq. 3: ``1/G sum_i 1/|o_i| sum_t``).
        - ``seq_mean_token_sum``: sum over each row's valid tokens, then mean over rows
          (no length normalization, as in Dr. GRPO, Liu et al. 2025).
    Rows with no valid token are left out of the mean over rows (they carry no signal).

    Args:
        loss: ``(b, a)``.
        mask: ``(b, a)``, 0/1 or bool.
        mode: one of ``AGG_MODES``.

    Returns:
        ``()``.
    """
    if mode == "token_mean":
        return masked_mean(loss, mask)
    if mode == "seq_mean_token_mean":
        per_row = masked_mean(loss, mask, dim=-1)
    elif mode == "seq_mean_token_sum":
        per_row = masked_sum(loss, mask, dim=-1)
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")
    row_has_tokens = mask.bool().expand_as(loss).any(dim=-1)
    return masked_mean(per_row, row_has_tokens)
