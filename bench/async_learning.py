"""Learning check of the actor-learner mode: the synchronous run and ``trainer.max_staleness=1``
on the built-in task, same seed and steps (so the same number of samples); writes both gold
score curves into one PNG and prints the final gold of each (mean of the last steps).

    python bench/async_learning.py --steps 40 --out async_learning.png
    python bench/async_learning.py --steps 40 -- algo=grpo

Asserts nothing; the issue's bar is ``|gold(k=1) - gold(sync)| <= 0.05`` at the same samples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def curve(k: int, steps: int, overrides: list[str], cache: Path) -> list[dict]:
    from rlhf_ray.train import compose_config, run

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_config([f"trainer.output_dir={out}", f"model.cache_dir={cache}", f"trainer.total_steps={steps}",
                              "trainer.resume=never", f"trainer.max_staleness={k}", *overrides])
        run(cfg, Path(out))
        return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--last", type=int, default=5, help="steps averaged for the final gold score")
    p.add_argument("--out", default="async_learning.png")
    p.add_argument("--cache", default=".cache/rlhf_ray")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    a = p.parse_args()
    runs = {k: curve(k, a.steps, a.overrides, Path(a.cache).absolute()) for k in (0, 1)}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, rows in runs.items():
        samples, seen = [], 0
        for r in rows:
            seen += r["rollout/samples"]
            samples.append(seen)
        label = "synchronous" if k == 0 else f"max_staleness={k}"
        ax.plot(samples, [r.get("reward/gold") for r in rows], label=label)
    ax.set_xlabel("completions trained on")
    ax.set_ylabel("reward/gold (built-in task)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}; machine load {os.getloadavg()[0]:.1f}")
    finals = {k: statistics.mean(r["reward/gold"] for r in rows[-a.last:]) for k, rows in runs.items()}
    for k, g in finals.items():
        print(f"max_staleness={k}: final gold (mean of last {a.last} steps) {g:.3f}")
    print(f"difference {finals[1] - finals[0]:+.3f} (bar: within 0.05)")


if __name__ == "__main__":
    main()
