"""The proxy-up / gold-down check (reward over-optimisation, Gao et al. 2022)."""

import math

import pytest

from rlhf_ray.algo.overoptimization import proxy_gold_divergence


def test_hand_computed_window_of_four():
    # proxy 0,0,1,1: halves 0 and 1, std over the window = sqrt(4 * 0.25 / 3) = 0.5774 -> +1.732
    # gold  1,1,0,0: the mirror image -> -1.732
    d = proxy_gold_divergence([0, 0, 1, 1], [1, 1, 0, 0], window=4, min_change=1.0)
    assert d is not None and d.window == 4
    assert d.proxy_change == pytest.approx(1 / math.sqrt(1 / 3))
    assert d.gold_change == pytest.approx(-1 / math.sqrt(1 / 3))


def test_only_the_last_window_counts():
    proxy = [5, 5, 5, 5, 0, 0, 1, 1]
    gold = [0, 0, 0, 0, 1, 1, 0, 0]
    assert proxy_gold_divergence(proxy, gold, window=4) is not None
    assert proxy_gold_divergence(proxy, gold, window=8) is None  # proxy fell over 8 steps


@pytest.mark.parametrize("proxy, gold", [
    ([0, 0, 1, 1], [0, 0, 1, 1]),  # both rise: healthy RL
    ([1, 1, 0, 0], [1, 1, 0, 0]),  # both fall
    ([0, 0, 1, 1], [1, 1, 1, 1]),  # gold flat
    ([0, 0, 0.1, 0.1, 0, 0, 0.1, 0.1][-4:], [1, 1, 1, 1]),
])
def test_no_divergence(proxy, gold):
    assert proxy_gold_divergence(proxy, gold, window=4) is None


def test_needs_a_full_finite_window():
    assert proxy_gold_divergence([0, 1, 1], [1, 0, 0], window=4) is None
    assert proxy_gold_divergence([0, 0, 1, 1], [1, float("nan"), 0, 0], window=4) is None


def test_small_moves_against_noise_do_not_fire():
    # a rise of 0.3 std and a fall of 0.3 std stay under min_change=1
    proxy = [0.0, 1.0, 0.0, 1.0, 0.1, 1.1, 0.1, 1.1]
    gold = [1.0, 0.0, 1.0, 0.0, 0.9, -0.1, 0.9, -0.1]
    assert proxy_gold_divergence(proxy, gold, window=8, min_change=1.0) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="same steps"):
        proxy_gold_divergence([0, 1], [0], window=4)
    with pytest.raises(ValueError, match="window"):
        proxy_gold_divergence([0, 1], [0, 1], window=2)


def test_trainer_warns_once_at_the_onset(caplog):
    from rlhf_ray.trainer import Trainer

    # 20 healthy steps, then the proxy keeps rising while gold falls
    history = [{"reward/mean": 0.1 * i, "reward/gold": 0.5 + 0.01 * i} for i in range(20)]
    history += [{"reward/mean": 2.0 + 0.1 * i, "reward/gold": 0.7 - 0.03 * i} for i in range(20)]
    with caplog.at_level("WARNING", logger="rlhf_ray.trainer"):
        for n in range(1, len(history) + 1):
            Trainer._warn_overoptimization(history[:n])
    warnings = [r for r in caplog.records if "over-optimisation" in r.message]
    assert len(warnings) == 1 and "reward/gold fell" in warnings[0].message
