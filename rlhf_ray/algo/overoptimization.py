"""Reward over-optimisation check: the gold score fell from its peak while the proxy did not.

Optimising a learned reward model past a point makes the true (gold) reward go down while the
proxy keeps going up (Gao et al. 2022, "Scaling laws for reward model overoptimization": gold
is a rise-then-fall function of the optimisation distance, the proxy rises monotonically). So
the check looks at the whole history, not at a fixed recent window: both series are smoothed
(trailing mean over ``smooth`` steps); the gold peak is where the smoothed gold was highest; it
fires when the smoothed gold is now at least ``min_drop`` below that peak while the smoothed
proxy is at or above its value at the peak. Late in a run the proxy often creeps up only
slowly while gold collapses; a same-window "proxy up, gold down" test misses that.

Drops are measured in units of each series' step-to-step noise, estimated from successive
differences (``sqrt(mean(diff^2) / 2)``, von Neumann 1941): a slow trend barely moves that
estimate, so a reward model's logits and a 0-1 gold score are comparable and a long fall is
not hidden by its own trend (a plain standard deviation over the window would grow with it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    """How the smoothed series moved since the smoothed gold peak."""

    gold_drop: float  # peak minus now, in gold step-to-step noise units (> 0: gold fell)
    proxy_change: float  # now minus value at the gold peak, in proxy noise units
    peak_step: int  # index (0-based, into the series) of the last step of the peak's window


def step_noise(values: Sequence[float]) -> float:
    """Per-step noise standard deviation from successive differences: ``sqrt(mean(diff^2) / 2)``."""
    diffs = [b - a for a, b in zip(values, values[1:], strict=False)]
    if not diffs:
        return 0.0
    return math.sqrt(sum(d * d for d in diffs) / (2 * len(diffs)))


def trailing_means(values: Sequence[float], n: int) -> list[float]:
    """Mean of each full window of ``n`` consecutive values (``len(values) - n + 1`` of them)."""
    return [sum(values[i - n + 1 : i + 1]) / n for i in range(n - 1, len(values))]


def proxy_gold_divergence(
    proxy: Sequence[float], gold: Sequence[float], smooth: int = 10, min_drop: float = 1.0
) -> Divergence | None:
    """A :class:`Divergence` if the smoothed gold fell from its peak while the proxy did not.

    Args:
        proxy: per-step proxy reward (oldest first), e.g. ``reward/mean``, all from one reward
            model (a new reward model changes the proxy's scale: start a new series).
        gold: per-step gold score, same steps as ``proxy``.
        smooth: steps in the trailing means (>= 2); fewer than ``2 * smooth`` steps never fire.
        min_drop: least fall of the smoothed gold below its peak, in gold step-to-step noise
            units (1.0 = one step's noise = ``sqrt(smooth)`` standard errors of a smoothed value).

    Returns:
        ``None`` when there is no divergence (or not enough finite history).
    """
    if len(proxy) != len(gold):
        raise ValueError(f"proxy and gold must cover the same steps, got {len(proxy)} and {len(gold)}")
    if smooth < 2:
        raise ValueError(f"smooth must be >= 2, got {smooth}")
    p, g = list(proxy), list(gold)
    if len(p) < 2 * smooth or not all(math.isfinite(x) for x in p + g):
        return None
    g_noise, p_noise = step_noise(g), step_noise(p)
    if g_noise == 0.0:
        return None  # a constant gold never fell
    sg, sp = trailing_means(g, smooth), trailing_means(p, smooth)
    peak = max(range(len(sg)), key=lambda i: sg[i])
    gold_drop = (sg[peak] - sg[-1]) / g_noise
    proxy_change = (sp[-1] - sp[peak]) / p_noise if p_noise else 0.0
    if gold_drop >= min_drop and proxy_change >= 0.0:
        return Divergence(gold_drop, proxy_change, peak + smooth - 1)
    return None
