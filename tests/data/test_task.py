"""Tests for rlhf_ray.data.task (gold labeler, demonstrator) and rlhf_ray.data.generate."""

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlhf_ray.data.datasets import load_comparison_dataset, load_prompt_dataset, load_sft_dataset
from rlhf_ray.data.generate import ensure_task_data, generate_task_data
from rlhf_ray.data.task import (
    DEFAULT_TASK,
    DemonstratorSpec,
    TaskSpec,
    corrupt,
    demonstrate,
    gold_reward,
    gold_score,
    make_prompt,
    rank_completions,
    reference_answer,
)

SMALL = dict(
    n_prompts_train=300, n_prompts_eval=60, n_sft_train=300, n_sft_eval=60,
    n_comparisons_train=200, n_comparisons_eval=60,
)  # fmt: skip


def test_prompt_format_and_reference() -> None:
    rng = random.Random(0)
    for _ in range(200):
        prompt = make_prompt(rng)
        word = prompt[len("rev ") : -1]
        assert prompt.startswith("rev ") and prompt.endswith("=")
        assert 3 <= len(word) <= 6 and set(word) <= set("abcdefgh")
        assert reference_answer(prompt) == word[::-1]
    assert reference_answer("rev abcde=") == "edcba"
    with pytest.raises(ValueError, match="not a prompt of the reverse task"):
        reference_answer("reverse abc")


def test_gold_score_by_hand() -> None:
    # Reference for "rev abc=" is "cba".
    assert gold_score("rev abc=", "cba") == 1.0
    # A copy "abc" vs "cba": only the middle 'b' matches -> 1/3.
    assert gold_score("rev abc=", "abc") == pytest.approx(1 / 3)
    assert gold_score("rev abc=", "") == 0.0
    # Too long: 3 matches out of max(3, 5) = 5 positions.
    assert gold_score("rev abc=", "cbaaa") == pytest.approx(3 / 5)
    # Too short: 2 matches out of 3.
    assert gold_score("rev abc=", "cb") == pytest.approx(2 / 3)
    # Text after EOS is ignored and whitespace stripped.
    assert gold_score("rev abc=", " cba <eos>junk") == 1.0
    assert gold_reward(["rev abc=", "rev ab="], ["cba", "xx"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        gold_reward(["rev abc=", "rev ab="], ["cba"])


def test_rank_completions_best_to_worst_stable() -> None:
    prompt = "rev abcd="  # reference "dcba"
    ranked = rank_completions(prompt, ["abcd", "dcbx", "dcba", "xxxx", "dcxa"])
    # Scores: abcd 0, dcbx .75, dcba 1, xxxx 0, dcxa .75 -> ties keep input order.
    assert ranked == ["dcba", "dcbx", "dcxa", "abcd", "xxxx"]


def test_demonstrator_mixture_proportions() -> None:
    rng = random.Random(123)
    spec = TaskSpec(min_len=6, max_len=6)  # long words: a copy is almost never also correct
    kinds: Counter[str] = Counter()
    for _ in range(2000):
        prompt = make_prompt(rng, spec)
        word = prompt[4:-1]
        demo = demonstrate(rng, prompt, spec)
        if demo == word[::-1]:
            kinds["correct"] += 1
        elif demo == word:
            kinds["copy"] += 1
        else:
            diffs = sum(a != b for a, b in zip(demo, word[::-1], strict=True))
            assert 1 <= diffs <= 2 and len(demo) == len(word)
            kinds["corrupt"] += 1
    # Binomial std for n=2000 is ~0.011; 0.04 is > 3 sigma.
    assert kinds["correct"] / 2000 == pytest.approx(0.40, abs=0.04)
    assert kinds["copy"] / 2000 == pytest.approx(0.55, abs=0.04)
    assert kinds["corrupt"] / 2000 == pytest.approx(0.05, abs=0.03)


def test_demonstrator_mean_gold_score_is_mediocre() -> None:
    rng = random.Random(0)
    scores = []
    for _ in range(2000):
        prompt = make_prompt(rng)
        scores.append(gold_score(prompt, demonstrate(rng, prompt)))
    # Hand estimate: .4 * 1 + .55 * ~.24 (copy) + .05 * ~.7 (1-2 wrong letters) ~ 0.57.
    assert 0.5 < sum(scores) / len(scores) < 0.65


def test_corruptions_are_wrong_and_non_empty() -> None:
    rng = random.Random(0)
    for _ in range(500):
        prompt = make_prompt(rng)
        text = corrupt(rng, prompt)
        assert text.strip()
        assert set(text) <= set(DEFAULT_TASK.alphabet)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="min_len"):
        TaskSpec(min_len=5, max_len=3)
    with pytest.raises(ValueError, match="p_correct"):
        DemonstratorSpec(p_correct=0.8, p_copy=0.5)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_task_data_files_valid_deterministic_disjoint(tmp_path: Path) -> None:
    paths = generate_task_data(tmp_path / "a", seed=3, **SMALL)
    assert set(paths) == {f"{k}_{s}" for k in ("prompts", "sft", "comparisons") for s in ("train", "eval")}
    # Same seed -> same bytes; another seed -> other data.
    again = generate_task_data(tmp_path / "b", seed=3, **SMALL)
    other = generate_task_data(tmp_path / "c", seed=4, **SMALL)
    for name, path in paths.items():
        assert path.read_bytes() == again[name].read_bytes(), name
        assert path.read_bytes() != other[name].read_bytes(), name

    # Every file goes through the validating loaders.
    assert len(load_prompt_dataset(paths["prompts_train"])) == 300
    assert len(load_sft_dataset(paths["sft_eval"])) == 60
    comparisons = load_comparison_dataset(paths["comparisons_train"])
    assert len(comparisons) == 200
    for row in comparisons:
        completions = row["completions"]
        assert len(completions) == 4 and len(set(completions)) == 4
        scores = [gold_score(row["messages"][0]["content"], c) for c in completions]
        assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]

    train = {r["messages"][0]["content"] for k in ("prompts", "sft", "comparisons") for r in _read(paths[f"{k}_train"])}
    evals = {r["messages"][0]["content"] for k in ("prompts", "sft", "comparisons") for r in _read(paths[f"{k}_eval"])}
    assert not train & evals


def test_ensure_task_data_keeps_files_and_checks_params(tmp_path: Path) -> None:
    paths = ensure_task_data(tmp_path, seed=1, **SMALL)
    sft = paths["sft_train"]
    sft.write_text('{"prompt": "rev ab=", "response": "ba"}\n', encoding="utf-8")
    paths["prompts_eval"].unlink()
    ensure_task_data(tmp_path, seed=1, **SMALL)
    assert len(_read(sft)) == 1  # existing file kept
    # The regenerated file equals what a full generation writes.
    full = generate_task_data(tmp_path / "full", seed=1, **SMALL)
    assert paths["prompts_eval"].read_bytes() == full["prompts_eval"].read_bytes()
    with pytest.raises(ValueError, match="task data was generated with"):
        ensure_task_data(tmp_path, seed=2, **SMALL)


def test_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.data.generate", str(tmp_path), "--seed", "7"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert "prompts_train" in result.stdout
    assert len(_read(tmp_path / "sft_train.jsonl")) == 4000
