"""Benchmark: throughput and model FLOP utilisation (MFU) of RL steps against this machine's peak.

    python bench/throughput.py                                  # both settings, GRPO and PPO
    python bench/throughput.py --setting small --algo grpo      # one run (about a minute)
    python bench/throughput.py --setting large --steps 3 -- rollout.num_engines=1

Settings (the peer-benchmark shapes of issue 13; one epoch, one minibatch, rule reward):
- small: tiny Llama 3.2M (hidden 256, 4 layers, 4 heads), 8 prompts x 8 samples x 16 new tokens;
- large: Llama 25.4M (hidden 512, 8 layers, 8 heads), 16 prompts x 8 samples x 64 new tokens.

Each run is ``python -m rlhf_ray.train`` in a subprocess (a cold start, as a user sees it).
Printed per run: start-up seconds (launch -> first step begins, seen as the first metrics row
appearing minus that step's own seconds), steady s/step (mean of steps 2..n), completions/s,
tokens/s per phase, and MFU per phase and per step. Useful FLOPs are 2·N·tokens per forward
pass and 6·N·tokens per training pass (N = parameters in matmuls: all but the input
embedding), on real tokens only (no padding), counting only the passes a step needs:
rollout = prefill + decode of every sequence; experience = reference forward (each distinct
prompt once: the reference runs a prompt's samples on its cache) (+ critic values forward, + the
old-logprob forward only when the update has more than one epoch or minibatch); update = policy
training (each distinct prompt once, as the reference) (+ critic training). The peak is the fp32 matmul rate this script measures
itself with all the machine's cores (``torch.get_num_threads()`` = the cores). Prints numbers;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "small": dict(hidden=256, layers=4, heads=4, prompts=8, samples=8, new_tokens=16),
    "large": dict(hidden=512, layers=8, heads=8, prompts=16, samples=8, new_tokens=64),
}
PHASES = ("rollout", "reward", "experience", "advantages", "update", "sync")
ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(threads: int, size: int = 1024, seconds: float = 2.0) -> float:
    """Best fp32 matmul rate (FLOP/s) of ``size`` x ``size`` products on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def overrides_for(setting: dict, algo: str, steps: int, cache: Path, out: Path) -> list[str]:
    s = setting
    return [
        f"algo={algo}", "algo.epochs=1", "algo.minibatches=1", "reward=rule",
        f"model.tiny.hidden_size={s['hidden']}", f"model.tiny.num_layers={s['layers']}",
        f"model.tiny.num_heads={s['heads']}", f"model.tiny.max_position_embeddings={s['new_tokens'] + 64}",
        f"trainer.prompts_per_step={s['prompts']}", f"rollout.n_samples_per_prompt={s['samples']}",
        f"rollout.max_new_tokens={s['new_tokens']}", f"trainer.total_steps={steps}",
        f"model.cache_dir={cache}", f"trainer.output_dir={out}", f"hydra.run.dir={out}/hydra",
        "trainer.resume=never",
    ]


def launch(overrides: list[str], out: Path, log: Path, repo: Path) -> tuple[float, dict, list[dict]]:
    """Run ``repo``'s trainer; returns (seconds from launch to the first step's start, summary, metric rows)."""
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    metrics = out / "metrics.jsonl"
    launched = time.time()
    first_row_at = None
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.train", *overrides], cwd=repo, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if first_row_at is None and metrics.exists() and metrics.read_text().strip():
                first_row_at = time.time()
            time.sleep(0.05)
    if proc.returncode:
        raise RuntimeError(f"training failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    first_row_at = first_row_at or time.time()
    startup = first_row_at - launched - rows[0]["timing/step"]
    return startup, json.loads((out / "summary.json").read_text()), rows


def param_counts(model_dir: Path) -> tuple[float, float]:
    """(policy N, critic N): parameters in matmuls (all but the input embedding); the critic is
    the same backbone with a one-unit value head instead of the LM head."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    return float(body + h * vocab), float(body + h)


def report(name: str, algo: str, startup: float, summary: dict, rows: list[dict], n: tuple[float, float],
           peak: float, samples_per_prompt: int = 1) -> dict:
    warm = rows[1:] or rows
    mean = lambda k: statistics.mean(r.get(k, 0.0) for r in warm)  # noqa: E731
    step_s = mean("timing/step")
    samples, response = mean("rollout/samples"), mean("rollout/tokens")
    prompt = mean("rollout/prompt_tokens") or response / 16 * 10  # fallback for runs without the key
    seq_tokens = prompt + response
    critic = algo in ("ppo", "a2c")
    n_pol, n_crit = n
    # the reference forward and the policy's training pass run each distinct prompt once
    # (workers/forward.shared_prompt_logits; ZeRO 0-2), the critic every row (old logprobs not needed)
    reference_tokens = prompt / samples_per_prompt + response
    flops = {
        "rollout": 2 * n_pol * seq_tokens,
        "experience": 2 * n_pol * reference_tokens + (2 * n_crit * seq_tokens if critic else 0),
        "update": 6 * n_pol * reference_tokens + (6 * n_crit * seq_tokens if critic else 0),
    }
    phases = {p: mean(f"timing/{p}") for p in PHASES}
    out = {
        "setting": name, "algo": algo, "startup_s": startup, "first_step_s": rows[0]["timing/step"],
        "step_s": step_s, "completions_per_s": samples / step_s, "tokens_per_step": seq_tokens,
        "phases_s": phases, "startup_roles_s": summary.get("startup", {}),
        "tokens_per_s": {"rollout (generated)": response / phases["rollout"],
                         "experience": seq_tokens / max(phases["experience"], 1e-9),
                         "update": seq_tokens / max(phases["update"], 1e-9)},
        "mfu": {p: flops[p] / (phases[p] * peak) for p in flops},
        "step_mfu": sum(flops.values()) / (step_s * peak), "step_tflop": sum(flops.values()) / 1e12,
    }
    return out


def show(r: dict, target: float | None) -> None:
    print(f"\n== {r['setting']} / {r['algo']}: {r['step_s']:.2f} s/step"
          + (f" (target <= {target} s: {'met' if r['step_s'] <= target else 'MISSED'})" if target else ""))
    print(f"start-up to first step {r['startup_s']:.1f} s; first step {r['first_step_s']:.2f} s; "
          f"{r['completions_per_s']:.1f} completions/s; {r['tokens_per_step']:.0f} tokens/step; "
          f"{r['step_tflop'] * 1000:.0f} GFLOP/step; step MFU {r['step_mfu']:.1%}")
    if r["startup_roles_s"]:
        print("  init seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["startup_roles_s"].items()))
    print("  " + "  ".join(f"{p} {s:.3f}s" for p, s in r["phases_s"].items()))
    print("  tokens/s: " + ", ".join(f"{p} {v:,.0f}" for p, v in r["tokens_per_s"].items()))
    print("  MFU: " + ", ".join(f"{p} {v:.1%}" for p, v in r["mfu"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=("small", "large", "both"), default="both")
    p.add_argument("--algo", choices=("grpo", "ppo", "both"), default="both")
    p.add_argument("--steps", type=int, default=5, help="steps per run; the first is warm-up")
    p.add_argument("--cache", default=".cache/rlhf_ray")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--repo", default=str(ROOT), help="checkout whose trainer runs (before/after comparisons)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    peak = matmul_peak(cores)
    print(f"fp32 matmul peak on {cores} threads: {peak / 1e9:.1f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.2f} (1 min)")
    targets = {"small": 0.7, "large": 24.0}
    results = []
    cache = Path(a.cache).absolute()
    for name in ("small", "large") if a.setting == "both" else (a.setting,):
        for algo in ("grpo", "ppo") if a.algo == "both" else (a.algo,):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run"
                s = SETTINGS[name]
                startup, summary, rows = launch(overrides_for(s, algo, a.steps, cache, out) + a.overrides,
                                                out, Path(tmp) / "train.log", Path(a.repo))
                model = cache / f"tiny-llama-h{s['hidden']}-l{s['layers']}-a{s['heads']}-p{s['new_tokens'] + 64}-s0"
                r = report(name, algo, startup, summary, rows, param_counts(model), peak, s["samples"])
            r["n_params"] = param_counts(model)[0]
            results.append(r)
            show(r, targets[name])
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; start-up target <= 20 s")
    if a.json:
        Path(a.json).write_text(json.dumps({"peak_flops": peak, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
