"""Writes the built-in task's data files (prompts, SFT demos, ranked comparisons).

Files written into ``out_dir`` (JSON lines, one object per line):

* ``prompts_{train,eval}.jsonl``      ``{"prompt": str}``                 (PPO prompts)
* ``sft_{train,eval}.jsonl``          ``{"prompt": str, "response": str}`` (noisy demos)
* ``comparisons_{train,eval}.jsonl``  ``{"prompt": str, "completions": [k strings, best -> worst]}``

Responses and completions carry no EOS text: trainers append the tokenizer's
EOS token. Prompts are split into train and eval by a hash of their text, so no
eval prompt of any file appears in any train file. Every file has its own
random stream derived from ``seed``, so generating a missing file alone gives
the same bytes as generating all of them (that is what makes
:func:`ensure_task_data` safe). CLI: ``python -m rlhf_ray.data.generate OUT_DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf_ray.data.task import (
    DEFAULT_DEMONSTRATOR,
    DEFAULT_TASK,
    DemonstratorSpec,
    TaskSpec,
    corrupt,
    demonstrate,
    gold_score,
    make_prompt,
    rank_completions,
)

META_FILE = "task_meta.json"
EVAL_FRACTION_PER_MILLE = 100  # ~10 % of the prompt space is reserved for eval


def is_eval_prompt(prompt: str) -> bool:
    """Deterministic train/eval split of the prompt space (stable across Python runs)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < EVAL_FRACTION_PER_MILLE


def split_prompt(rng: random.Random, split: str, spec: TaskSpec) -> str:
    """A random prompt that belongs to ``split`` (rejection sampling on the hash split)."""
    want_eval = split == "eval"
    while True:
        prompt = make_prompt(rng, spec)
        if is_eval_prompt(prompt) == want_eval:
            return prompt


def comparison_row(
    rng: random.Random, prompt: str, k: int, spec: TaskSpec, demo: DemonstratorSpec
) -> dict[str, object]:
    """``k`` distinct completions (demos and corruptions) ranked by the gold labeler.

    Half of the candidates come from the demonstrator (so the reward model sees
    the SFT policy's kind of answers, including correct ones), half from varied
    corruptions. Rankings where every completion scores the same carry no
    preference and are drawn again.
    """
    for _ in range(1000):
        candidates: list[str] = []
        while len(candidates) < k:
            text = demonstrate(rng, prompt, spec, demo) if rng.random() < 0.5 else corrupt(rng, prompt, spec)
            if text not in candidates:
                candidates.append(text)
        if len({gold_score(prompt, c, spec) for c in candidates}) > 1:
            return {"prompt": prompt, "completions": rank_completions(prompt, candidates, spec)}
    raise RuntimeError(f"could not draw {k} completions with distinct gold scores for {prompt!r}")


def _rows(
    kind: str, split: str, n: int, rng: random.Random, k: int, spec: TaskSpec, demo: DemonstratorSpec
) -> Iterator[dict[str, object]]:
    """``n`` rows of one file; ``kind`` is prompts | sft | comparisons."""
    for _ in range(n):
        prompt = split_prompt(rng, split, spec)
        if kind == "prompts":
            yield {"prompt": prompt}
        elif kind == "sft":
            yield {"prompt": prompt, "response": demonstrate(rng, prompt, spec, demo)}
        else:
            yield comparison_row(rng, prompt, k, spec, demo)


def _write_jsonl_atomic(path: Path, rows: Iterator[dict[str, object]]) -> None:
    # Write then rename, so an interrupted run never leaves a partial file that
    # ensure_task_data would later take as complete.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # runs sharing a cache may write at once
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def generate_task_data(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_prompts_train: int = 2000,
    n_prompts_eval: int = 200,
    n_sft_train: int = 4000,
    n_sft_eval: int = 200,
    n_comparisons_train: int = 8000,  # the tiny reward model needs many to tell near-misses apart
    n_comparisons_eval: int = 200,
    k: int = 4,
    spec: TaskSpec = DEFAULT_TASK,
    demo: DemonstratorSpec = DEFAULT_DEMONSTRATOR,
    keep_existing: bool = False,
) -> dict[str, Path]:
    """Write the six files; returns ``{"prompts_train": path, ...}``.

    ``keep_existing=True`` leaves files that already exist alone (see
    :func:`ensure_task_data`). A ``task_meta.json`` records seed, sizes and
    specs; keeping files that were generated with other ones is an error
    rather than a silent reuse.
    """
    if k < 2:
        raise ValueError(f"k (completions per comparison) must be >= 2, got {k}")
    sizes = {
        ("prompts", "train"): n_prompts_train,
        ("prompts", "eval"): n_prompts_eval,
        ("sft", "train"): n_sft_train,
        ("sft", "eval"): n_sft_eval,
        ("comparisons", "train"): n_comparisons_train,
        ("comparisons", "eval"): n_comparisons_eval,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"seed": seed, "k": k, "task": asdict(spec), "demonstrator": asdict(demo)}
    meta.update({f"n_{kind}_{split}": n for (kind, split), n in sizes.items()})
    meta_path = out / META_FILE
    if keep_existing and meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old != meta:
            raise ValueError(f"{meta_path}: task data was generated with {old}, now asked for {meta}")
    paths: dict[str, Path] = {}
    for (kind, split), n in sizes.items():
        name = f"{kind}_{split}"
        paths[name] = out / f"{name}.jsonl"
        if keep_existing and paths[name].exists():
            continue
        # One stream per file: str seeds are hashed with SHA-512 by random.seed,
        # so this is stable across processes and Python versions.
        rng = random.Random(f"rlhf_ray.task:{seed}:{name}")
        _write_jsonl_atomic(paths[name], _rows(kind, split, n, rng, k, spec, demo))
    meta_path.write_text(json.dumps(meta, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def ensure_task_data(out_dir: str | os.PathLike[str], seed: int = 0, **kwargs: Any) -> dict[str, Path]:
    """Generate only the files missing from ``out_dir``; same arguments as :func:`generate_task_data`."""
    return generate_task_data(out_dir, seed=seed, keep_existing=True, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_ray.data.generate", description="Write the built-in reverse task's data files."
    )
    parser.add_argument("out_dir", help="directory to write the JSONL files into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    for name, path in generate_task_data(args.out_dir, seed=args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
