"""The built-in synthetic task "reverse" and its hidden gold labeler.

Nothing can be downloaded, so the project ships a task that exercises the whole
InstructGPT recipe (SFT -> reward model -> PPO) on a tiny model:

* prompt ``"rev abcde="`` asks to reverse a short string of lowercase letters;
* the correct response is ``"edcba"`` followed by EOS (the EOS is the model's
  token, not part of the response text stored in the data files);
* :func:`gold_score` is the hidden "labeler" standing in for human raters: it
  ranks completions for the reward-model data and is the rule reward
  (:func:`gold_reward`, importable as ``rlhf_ray.data.task:gold_reward``);
* :func:`demonstrate` is a noisy demonstrator whose answers are right only some
  of the time, so SFT gives a mediocre policy that RL can then improve.

This module owns the task definition: prompt format, reference answers, gold
scores, rankings, demonstrations and corruptions. Pure standard library.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

# Text of the EOS token of the built-in tokenizer; a completion decoded with
# special tokens kept is cut there. (Kept as a literal so this module stays
# free of tokenizer imports.)
EOS_TEXT = "<eos>"


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the prompts of the "reverse" task."""

    alphabet: str = "abcdefgh"
    """Letters the strings to reverse are drawn from."""
    min_len: int = 3
    """Shortest string to reverse."""
    max_len: int = 6
    """Longest string to reverse."""
    prompt_prefix: str = "rev "
    """Text before the string in the prompt."""
    prompt_suffix: str = "="
    """Text after the string in the prompt; the response starts right after it."""

    def __post_init__(self) -> None:
        if len(set(self.alphabet)) < 2:
            raise ValueError(f"TaskSpec.alphabet needs at least 2 distinct characters, got {self.alphabet!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"TaskSpec needs 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if not self.prompt_suffix:
            # Without a suffix the end of the string to reverse would be ambiguous.
            raise ValueError("TaskSpec.prompt_suffix must not be empty")


@dataclass(frozen=True)
class DemonstratorSpec:
    """Mixture of answer kinds of the noisy demonstrator (like uneven human demos)."""

    p_correct: float = 0.4
    """Probability of the correct reversed string."""
    p_copy: float = 0.55
    """Probability of a plain copy (forgot to reverse); the rest are corrupted reverses.

    Why these numbers (tuned for the demo, see rlhf_ray/pipeline.py): the SFT policy imitates
    the mixture (gold ~0.55 sampled at T=1). Copies are the demonstrator's main flaw: a tiny
    reward model tells them from correct answers almost always, so RL can remove them (gold
    ~0.9), while letter-level slips (1-2 wrong letters) are ones such a reward model often
    misranks; with many of those in the demonstrations, PPO on the learned reward plateaus
    near 0.8 as it trades copies for near-misses the reward model cannot see."""
    max_replacements: int = 2
    """A corrupted reverse has 1..max_replacements characters replaced."""

    def __post_init__(self) -> None:
        if self.p_correct < 0 or self.p_copy < 0 or self.p_correct + self.p_copy > 1:
            raise ValueError(
                f"DemonstratorSpec needs p_correct, p_copy >= 0 and p_correct + p_copy <= 1, "
                f"got {self.p_correct}, {self.p_copy}"
            )
        if self.max_replacements < 1:
            raise ValueError(f"DemonstratorSpec.max_replacements must be >= 1, got {self.max_replacements}")


DEFAULT_TASK = TaskSpec()
DEFAULT_DEMONSTRATOR = DemonstratorSpec()


def make_prompt(rng: random.Random, spec: TaskSpec = DEFAULT_TASK) -> str:
    """A random prompt, e.g. ``"rev abcde="``."""
    length = rng.randint(spec.min_len, spec.max_len)
    word = "".join(rng.choice(spec.alphabet) for _ in range(length))
    return f"{spec.prompt_prefix}{word}{spec.prompt_suffix}"


def prompt_word(prompt: str, spec: TaskSpec = DEFAULT_TASK) -> str:
    """The string the prompt asks to reverse; ValueError if the prompt is not of this task."""
    if not (prompt.startswith(spec.prompt_prefix) and prompt.endswith(spec.prompt_suffix)):
        raise ValueError(
            f"not a prompt of the reverse task (expected {spec.prompt_prefix!r}...{spec.prompt_suffix!r}): {prompt!r}"
        )
    word = prompt[len(spec.prompt_prefix) : len(prompt) - len(spec.prompt_suffix)]
    if not word:
        raise ValueError(f"reverse-task prompt has nothing to reverse: {prompt!r}")
    return word


def reference_answer(prompt: str, spec: TaskSpec = DEFAULT_TASK) -> str:
    """The correct response text (without EOS): the prompt's string reversed."""
    return prompt_word(prompt, spec)[::-1]


def clean_completion(completion: str) -> str:
    """The text the labeler judges: everything before EOS, whitespace-stripped."""
    return completion.split(EOS_TEXT, 1)[0].strip()


def gold_score(prompt: str, completion: str, spec: TaskSpec = DEFAULT_TASK) -> float:
    """Gold labeler score in [0, 1].

    Per-position character matches against the reference, divided by
    ``max(len(reference), len(completion))`` so that both missing and extra
    characters cost. Example: reference ``"cba"``, completion ``"abc"`` -> only
    the middle matches -> 1/3; ``"cbax"`` -> 3/4; ``""`` -> 0.
    """
    reference = reference_answer(prompt, spec)
    text = clean_completion(completion)
    matches = sum(a == b for a, b in zip(reference, text, strict=False))
    return matches / max(len(reference), len(text))


def gold_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Batch rule reward ("verifier") for the trainer: one gold score per pair."""
    if len(prompts) != len(completions):
        raise ValueError(f"gold_reward got {len(prompts)} prompts but {len(completions)} completions")
    return [gold_score(p, c) for p, c in zip(prompts, completions, strict=True)]


def rank_completions(prompt: str, completions: Sequence[str], spec: TaskSpec = DEFAULT_TASK) -> list[str]:
    """Completions ordered best -> worst by gold score; ties keep their input order."""
    # sorted() is stable, so equal scores stay in input order.
    return sorted(completions, key=lambda c: -gold_score(prompt, c, spec))


def replace_chars(rng: random.Random, text: str, n: int, alphabet: str) -> str:
    """``text`` with ``n`` distinct positions replaced by a *different* letter."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), min(n, len(chars))):
        chars[i] = rng.choice([c for c in alphabet if c != chars[i]])
    return "".join(chars)


def demonstrate(
    rng: random.Random,
    prompt: str,
    spec: TaskSpec = DEFAULT_TASK,
    demo: DemonstratorSpec = DEFAULT_DEMONSTRATOR,
) -> str:
    """One demonstration: correct, a plain copy, or a reverse with 1-2 wrong letters."""
    word = prompt_word(prompt, spec)
    u = rng.random()
    if u < demo.p_correct:
        return word[::-1]
    if u < demo.p_correct + demo.p_copy:
        return word
    n = rng.randint(1, demo.max_replacements)
    return replace_chars(rng, word[::-1], n, spec.alphabet)


def corrupt(rng: random.Random, prompt: str, spec: TaskSpec = DEFAULT_TASK) -> str:
    """A flawed answer of a random kind, to give reward-model data varied mistakes.

    Kinds: letters replaced, a letter dropped, a letter added, two neighbours
    swapped, a copy, a random string. Always non-empty.
    """
    answer = reference_answer(prompt, spec)
    kind = rng.randrange(6)
    if kind == 0:
        return replace_chars(rng, answer, rng.randint(1, 3), spec.alphabet)
    if kind == 1 and len(answer) > 1:
        i = rng.randrange(len(answer))
        return answer[:i] + answer[i + 1 :]
    if kind == 2:
        i = rng.randrange(len(answer) + 1)
        return answer[:i] + rng.choice(spec.alphabet) + answer[i:]
    if kind == 3 and len(answer) > 1:
        i = rng.randrange(len(answer) - 1)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
    if kind == 4:
        return answer[::-1]
    length = rng.randint(spec.min_len, spec.max_len)
    return "".join(rng.choice(spec.alphabet) for _ in range(length))
