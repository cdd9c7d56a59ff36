"""The gold-fell-from-its-peak / proxy-did-not check (reward over-optimisation, Gao et al. 2022)."""

import math

import pytest

from rlhf_ray.algo.overoptimization import proxy_gold_divergence, step_noise, trailing_means


def test_hand_computed_smooth_of_two():
    # gold 1,1,0,0: diffs 0,-1,0 -> noise sqrt((1/3) / 2) = 1/sqrt(6); means of 2: 1, .5, 0 -> peak at
    # index 0 (its window ends at step 1), drop (1 - 0) * sqrt(6). proxy 0,0,1,1: the mirror image.
    d = proxy_gold_divergence([0, 0, 1, 1], [1, 1, 0, 0], smooth=2, min_drop=1.0)
    assert d is not None and d.peak_step == 1
    assert d.gold_drop == pytest.approx(math.sqrt(6))
    assert d.proxy_change == pytest.approx(math.sqrt(6))


def test_helpers():
    assert step_noise([0, 2, 0]) == pytest.approx(math.sqrt((4 + 4) / 2 / 2))  # diffs 2, -2
    assert step_noise([3.0]) == 0.0
    assert trailing_means([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]


def test_a_slow_proxy_creep_with_a_long_gold_fall_fires():
    # what a same-window "proxy up by 1 std" test misses: gold rose, then fell steadily for 30
    # steps, while the proxy only crept up (0.01 a step under noise 0.5)
    noise = [0.5 if i % 2 else -0.5 for i in range(60)]
    gold = [0.5 + 0.01 * i for i in range(30)] + [0.8 - 0.01 * i for i in range(30)]
    gold = [g + 0.05 * n for g, n in zip(gold, noise, strict=True)]
    proxy = [1.0 + 0.01 * i + n for i, n in enumerate(noise)]
    d = proxy_gold_divergence(proxy, gold, smooth=10)
    assert d is not None and d.gold_drop > 1.0 and d.proxy_change >= 0.0


@pytest.mark.parametrize("proxy, gold", [
    ([0, 0, 1, 1], [0, 0, 1, 1]),  # both rise: healthy RL (gold's peak is now)
    ([1, 1, 0, 0], [1, 1, 0, 0]),  # both fall: the proxy fell too
    ([0, 0, 1, 1], [1, 1, 1, 1]),  # gold flat
])
def test_no_divergence(proxy, gold):
    assert proxy_gold_divergence(proxy, gold, smooth=2) is None


def test_a_dip_within_the_noise_does_not_fire():
    # gold alternates 0/1 (noise ~0.7 a step); its smoothed value dips by 0.05 at the end
    gold = [1, 0, 1, 0, 1, 0, 0.9, 0]
    assert proxy_gold_divergence([0, 1, 2, 3, 4, 5, 6, 7], gold, smooth=2) is None


def test_needs_enough_finite_history():
    assert proxy_gold_divergence([0, 0, 1], [1, 1, 0], smooth=2) is None
    assert proxy_gold_divergence([0, 0, 1, 1], [1, float("nan"), 0, 0], smooth=2) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="same steps"):
        proxy_gold_divergence([0, 1], [0], smooth=2)
    with pytest.raises(ValueError, match="smooth"):
        proxy_gold_divergence([0, 1], [0, 1], smooth=1)


def _warnings(caplog, history):
    from rlhf_ray.trainer import Trainer

    with caplog.at_level("WARNING", logger="rlhf_ray.trainer"):
        for n in range(1, len(history) + 1):
            Trainer._warn_overoptimization(history[:n])
    return [r for r in caplog.records if "over-optimisation" in r.message]


def test_trainer_warns_once_at_the_onset(caplog):
    # 20 healthy steps, then the proxy keeps rising while gold falls
    history = [{"reward/mean": 0.1 * i, "reward/gold": 0.5 + 0.01 * i} for i in range(20)]
    history += [{"reward/mean": 2.0 + 0.1 * i, "reward/gold": 0.7 - 0.03 * i} for i in range(20)]
    warnings = _warnings(caplog, history)
    assert len(warnings) == 1 and "reward/gold fell" in warnings[0].message


def test_trainer_judges_each_reward_model_version_on_its_own(caplog):
    # version 0 lifts gold to its peak; version 1 (swapped in after step 30) scores on a higher
    # scale while gold stays a little under that peak. Across versions this would read as
    # "proxy up, gold down"; within version 1 nothing fell.
    wobble = [0.02 if i % 2 else -0.02 for i in range(60)]
    history = [{"reward/mean": 0.01 * i, "reward/gold": 0.5 + 0.01 * i + wobble[i], "reward/model_version": 0}
               for i in range(30)]
    history[-1]["reward/model_version"] = 1  # the swap happens after the step: this row is still version 0's
    history += [{"reward/mean": 5.0 + wobble[i], "reward/gold": 0.7 + wobble[i], "reward/model_version": 1}
                for i in range(30, 60)]
    assert _warnings(caplog, history) == []
    flat = [{k: v for k, v in h.items() if k != "reward/model_version"} for h in history]
    assert len(_warnings(caplog, flat)) == 1  # the same numbers as one series would warn
