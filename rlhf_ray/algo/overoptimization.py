"""Reward over-optimisation check: the proxy reward rises while the gold score falls.

Optimising a learned reward model past a point makes the true (gold) reward go down while the
proxy keeps going up (Gao et al. 2022, "Scaling laws for reward model overoptimization"). Over
the last ``window`` steps we compare the mean of the newer half with the mean of the older
half, for the proxy and for the gold series, each in units of that series' own standard
deviation over the window (so a reward model's logits and a 0-1 gold score are comparable and
step-to-step noise alone rarely trips it). The check fires when the proxy rose and the gold
fell, each by at least ``min_change`` of those units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    """How the proxy and gold series moved over the window (newer half minus older half)."""

    proxy_change: float  # in proxy standard deviations over the window
    gold_change: float  # in gold standard deviations over the window
    window: int  # steps compared


def _half_change(values: Sequence[float]) -> float:
    """(mean of newer half - mean of older half) / std of all values; 0 for a flat series."""
    half = len(values) // 2
    older, newer = values[:half], values[len(values) - half :]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    if std == 0.0:
        return 0.0
    return (sum(newer) / len(newer) - sum(older) / len(older)) / std


def proxy_gold_divergence(
    proxy: Sequence[float], gold: Sequence[float], window: int = 20, min_change: float = 1.0
) -> Divergence | None:
    """A :class:`Divergence` if, over the last ``window`` steps, the proxy rose and gold fell.

    Args:
        proxy: per-step proxy reward (oldest first), e.g. ``reward/mean``.
        gold: per-step gold score, same steps as ``proxy``.
        window: steps compared (>= 4); fewer steps of history never fire.
        min_change: least rise (proxy) and fall (gold), in standard deviations over the window.

    Returns:
        ``None`` when there is no divergence (or not enough finite history).
    """
    if len(proxy) != len(gold):
        raise ValueError(f"proxy and gold must cover the same steps, got {len(proxy)} and {len(gold)}")
    if window < 4:
        raise ValueError(f"window must be >= 4, got {window}")
    p, g = list(proxy[-window:]), list(gold[-window:])
    if len(p) < window or not all(math.isfinite(x) for x in p + g):
        return None
    proxy_change, gold_change = _half_change(p), _half_change(g)
    if proxy_change >= min_change and gold_change <= -min_change:
        return Divergence(proxy_change, gold_change, window)
    return None
