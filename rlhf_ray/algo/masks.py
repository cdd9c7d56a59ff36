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

from dataclasses import dataclass

import torch

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


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


@dataclass(frozen=True)
class LossNormalizer:
    """The denominators of a loss over ONE full minibatch, however it is split.

    A minibatch is spread over data-parallel ranks and, on each rank, over micro-batches. A mean
    taken per micro-batch weighs tokens of short micro-batches more (and averaging over ranks does
    the same across ranks). Instead every micro-batch contributes ``numerator / denominator``
    where the denominator counts the *whole* minibatch (all micro-batches, all-reduced across
    ranks): the sum of the contributions is exactly the full-minibatch loss. veRL
    (``agg_loss`` with ``global_batch_size``/``dp_size``) and TRL (``num_items_in_batch``)
    normalise the same way.

    Attributes:
        tokens: valid tokens of the minibatch (all ranks).
        rows: rows with at least one valid token (all ranks); masked rows do not count.
        horizon: the constant per-row length of ``seq_mean_token_sum_norm`` (Dr. GRPO's
            ``MAX_TOKENS``, the generation budget).
    """

    tokens: float
    rows: float
    horizon: int = 1

    @staticmethod
    def of(mask: torch.Tensor, horizon: int | None = None) -> LossNormalizer:
        """The counts of one ``(b, a)`` mask (the whole minibatch when it is in one piece);
        ``horizon`` defaults to the padded width ``a``."""
        keep = mask.bool()
        return LossNormalizer(
            tokens=float(keep.sum()), rows=float(keep.any(dim=-1).sum()),
            horizon=int(keep.shape[-1] if horizon is None else horizon),
        )

    def denominator(self, mode: str) -> float:
        """What the summed per-token (or per-row) losses are divided by in ``mode``:
        ``token_mean`` -> tokens; ``seq_mean_*`` -> rows; ``seq_mean_token_sum_norm`` -> rows x horizon."""
        if mode == "token_mean":
            d = self.tokens
        elif mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
            d = self.rows
        elif mode == "seq_mean_token_sum_norm":
            d = self.rows * self.horizon
        else:
            raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")
        return max(d, 1.0)  # empty: the numerator is 0 too


def aggregate_loss(
    loss: torch.Tensor, mask: torch.Tensor, mode: str, norm: LossNormalizer | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``(b, a)`` to a scalar, ignoring masked positions.

    Modes (names as in veRL ``core_algos.agg_loss``):
        - ``token_mean``: sum over all valid tokens / number of valid tokens (OpenRLHF,
          CleanRL-style PPO, DAPO's token-level loss; long responses weigh more).
        - ``seq_mean_token_mean``: mean over each row's valid tokens, then mean over rows
          (the original GRPO objective, Shao et al. 2024 eq. 3: ``1/G sum_i 1/|o_i| sum_t``).
        - ``seq_mean_token_sum``: sum over each row's valid tokens, then mean over rows
          (no per-row length normalisation; the sum still scales with the response lengths).
        - ``seq_mean_token_sum_norm``: sum over all valid tokens / (rows x a constant horizon):
          Dr. GRPO's constant normaliser (Liu et al. 2025, "Understanding R1-Zero-Like Training",
          section 3.1: ``1/G sum_i 1/MAX_TOKENS sum_t``), unbiased in the response length.
    Rows with no valid token are left out of the row counts (they carry no signal).

    Args:
        loss: ``(b, a)``.
        mask: ``(b, a)``, 0/1 or bool.
        mode: one of ``AGG_MODES``.
        norm: the full minibatch's counts when this batch is one micro-batch of it (see
            ``LossNormalizer``); ``None`` = this batch is the whole minibatch (horizon ``a``).

    Returns:
        ``()``: this batch's share of the minibatch loss (the whole loss when ``norm`` is None).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")
    norm = LossNormalizer.of(mask) if norm is None else norm
    if mode == "seq_mean_token_mean":
        numerator = masked_mean(loss, mask, dim=-1).sum()  # empty rows add 0
    else:
        numerator = masked_sum(loss, mask)
    return numerator / norm.denominator(mode)
