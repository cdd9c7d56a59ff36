"""The evaluation's pure parts: statistics, the table, the curves plot, policy names."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_ray.eval_report import format_table, mean_se, plot_curves, read_metrics, rolling_mean, table_rows
from rlhf_ray.evaluate import policy_names, score_texts
from rlhf_ray.stage_config import EvalConfig


def test_mean_and_standard_error():
    # values 1, 2, 3: mean 2, sample variance 1, standard error sqrt(1 / 3)
    assert mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, math.sqrt(1 / 3)))
    assert mean_se([4.0]) == (4.0, 0.0)
    assert mean_se([1.0, float("nan"), 3.0]) == pytest.approx((2.0, 1.0))
    assert all(math.isnan(x) for x in mean_se([]))


def test_score_texts_gold_exact_and_reward_model():
    gold = lambda prompts, texts: [1.0 if t == "ba" else 0.5 for t in texts]  # noqa: E731
    rm = lambda prompts, texts: [float(len(t)) for t in texts]  # noqa: E731
    out = score_texts(["ab="] * 4, ["ba", "ba", "b", "bab"], gold, rm)
    assert out["gold"] == pytest.approx(0.75) and out["exact"] == 0.5
    assert out["reward_model"] == pytest.approx(2.0)  # lengths 2, 2, 1, 3
    assert "reward_model" not in score_texts(["ab="], ["ba"], gold, None)


def result(gold, kl, rm=None):
    sampled = {"gold": gold, "gold_se": 0.01, "exact": gold / 2, "kl": kl, "response_len": 4.0}
    greedy = {"gold": gold + 0.1, "exact": gold / 2 + 0.1, "response_len": 4.0}
    if rm is not None:
        sampled["reward_model"], greedy["reward_model"] = rm, rm + 1
    return {"sampled": sampled, "greedy": greedy}


def test_table_has_both_decodings_and_reward_model_columns_only_when_scored():
    header, rows = table_rows({"sft": result(0.5, 0.0, 1.0), "ppo": result(0.9, 2.5, 3.0)}, 1.0)
    assert header == ["policy", "gold T=1", "exact T=1", "gold greedy", "exact greedy", "RM T=1", "RM greedy",
                      "KL T=1", "len"]
    assert rows[1] == ["ppo", "0.900 ± 0.010", "0.450", "1.000", "0.550", "3.000", "4.000", "2.500", "4.0"]
    header, rows = table_rows({"sft": result(0.5, 0.0)}, 0.7)
    assert "RM T=0.7" not in header and "gold T=0.7" in header
    text = format_table(header, rows)
    assert text.splitlines()[0].startswith("policy") and text.splitlines()[2].startswith("sft")


def test_curves_plot_from_metrics_jsonl(tmp_path):
    rows = [{"step": s, "reward/mean": 0.1 * s, "reward/gold": 0.5, "kl/mean": 0.01 * s} for s in range(1, 6)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_metrics(path) == rows
    png = plot_curves(read_metrics(path), tmp_path / "curves.png", title="run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_curves([{"step": 1}], tmp_path / "empty.png")  # missing keys: empty panels, no error


def test_policy_names():
    assert policy_names(EvalConfig(policies=["/a/sft", "/b/ppo"])) == ["sft", "ppo"]
    assert policy_names(EvalConfig(policies=["/sft/model", "/ppo/model"])) == ["sft/model", "ppo/model"]
    assert policy_names(EvalConfig(policies=["/x", "/y"], names=["a", "b"])) == ["a", "b"]


def test_rolling_mean():
    assert rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rolling_mean([], 3) == []
