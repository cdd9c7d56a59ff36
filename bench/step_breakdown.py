"""Benchmark: per-phase seconds of RL steps, generated tokens/s, and weight-sync seconds
against the size of the weights.

    python bench/step_breakdown.py                          # default PPO topology, 4 steps
    python bench/step_breakdown.py --sizes 192,384,768      # sync time vs model size
    python bench/step_breakdown.py --steps 6 -- algo=grpo rollout.num_engines=1

Prints numbers; asserts nothing. The first step (engine warm-up) is reported separately.
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

PHASES = ("rollout", "reward", "experience", "advantages", "update", "sync", "step")


def bench_one(hidden: int, steps: int, overrides: list[str], cache: Path) -> dict:
    from rlhf_ray.train import compose_config, run

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_config([f"trainer.total_steps={steps}", f"trainer.output_dir={out}",
                              f"model.cache_dir={cache}", f"model.tiny.hidden_size={hidden}",
                              f"model.tiny.num_heads={max(1, hidden // 64)}", *overrides])
        run(cfg, Path(out))
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    warm = rows[1:] or rows
    mean = lambda k: statistics.mean(r[k] for r in warm)  # noqa: E731
    return {
        "hidden": hidden, "first_step_s": rows[0]["timing/step"],
        **{p: mean(f"timing/{p}") for p in PHASES},
        "tokens_per_s": mean("rollout/tokens_per_s"),
        "sync_s": mean("sync/seconds"), "weight_mb": rows[0]["sync/bytes"] / 2**20,
        "buckets": rows[0]["sync/buckets"], "logprob_diff": max(r["sync/check_logprob_diff"] for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sizes", default="192",
                   help="comma-separated model.tiny.hidden_size values (head size 64)")
    p.add_argument("--cache", default=".cache/rlhf_ray")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    a = p.parse_args()
    results = [bench_one(int(h), a.steps, a.overrides, Path(a.cache)) for h in a.sizes.split(",")]
    print("\nper-phase seconds (mean over steps 2..n)")
    print(f"{'hidden':>6} " + " ".join(f"{x:>10}" for x in PHASES) + f" {'first':>8} {'tok/s':>8}")
    for r in results:
        print(f"{r['hidden']:>6} " + " ".join(f"{r[x]:>10.3f}" for x in PHASES)
              + f" {r['first_step_s']:>8.2f} {r['tokens_per_s']:>8.0f}")
    print("\nweight sync")
    print(f"{'hidden':>6} {'MB':>8} {'buckets':>8} {'seconds':>8} {'MB/s':>8} {'max |dlogp|':>12}")
    for r in results:
        print(f"{r['hidden']:>6} {r['weight_mb']:>8.1f} {r['buckets']:>8.0f} {r['sync_s']:>8.3f} "
              f"{r['weight_mb'] / r['sync_s']:>8.0f} {r['logprob_diff']:>12.2e}")


if __name__ == "__main__":
    main()
