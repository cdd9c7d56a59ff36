"""Benchmark: synchronous steps vs the actor-learner mode (``trainer.max_staleness`` 1 and 2), on
the default topology and with a slow reward. Prints steps/s, completions/s and busy fractions;
asserts nothing.

The slow reward is a remote judge: an HTTP reward service on loopback that answers 300 ms after
each request, asked for one completion per request (``reward.batch_size=1``) with at most 8
requests in flight (``reward.max_concurrency=8``), as a hosted LLM judge scores one completion
per call over a limited number of connections. 64 completions a step then take ~2.4 s of
reward latency: the synchronous step waits for it, the actor-learner mode scores each engine's
share as it arrives while the learner trains.

    python bench/async_bench.py                      # both settings, staleness 0,1,2, 6 steps each
    python bench/async_bench.py --settings slow_reward --staleness 0,1 --steps 8 -- algo=grpo
    python bench/async_bench.py --settings slow_reward --judge-batch 4 --judge-concurrency 2

One set of worker groups per setting serves every staleness (start-up is not what is measured);
the first step of every run (warm-up, pipeline fill) is left out of the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


class SlowRewardServer:
    """POST {"prompts", "completions"} -> {"rewards"}: the completion's share of distinct
    characters, answered ``delay_s`` after the request arrived (a remote judge's latency)."""

    def __init__(self, delay_s: float):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay_s)
                rewards = [len(set(c)) / max(len(c), 1) for c in body["completions"]]
                data = json.dumps({"rewards": rewards}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_setting(overrides: list[str], staleness: list[int], steps: int, cache: Path) -> list[dict]:
    """Build the groups once, then one Trainer per ``max_staleness`` on them."""
    import ray

    from rlhf_ray.data import load_prompt_dataset, prompt_inputs, tokenize_prompts_with_index
    from rlhf_ray.data.chat import render_prompt
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.placement import resource_plan
    from rlhf_ray.runtime import build_groups, connect, resolve_assets
    from rlhf_ray.train import compose_config
    from rlhf_ray.trainer import Trainer

    def cfg_for(out: str, k: int):
        return compose_config([f"trainer.output_dir={out}", f"model.cache_dir={cache}", f"trainer.total_steps={steps}",
                               "trainer.resume=never", f"trainer.max_staleness={k}", *overrides])

    base = cfg_for(tempfile.mkdtemp(), 0)
    assets = resolve_assets(base)
    tokenizer = load_tokenizer(assets.policy_path)
    prompts = prompt_inputs(load_prompt_dataset(assets.train_prompts))
    ids, kept = tokenize_prompts_with_index(tokenizer, prompts, base.data.max_prompt_len, "truncate")
    prompts = [render_prompt(tokenizer, prompts[i]) for i in kept]  # the text rewards see, as train.py
    started = connect(base.cluster, resource_plan(base))
    groups = build_groups(base, assets)
    results = []
    try:
        for k in staleness:
            with tempfile.TemporaryDirectory() as out:
                trainer = Trainer(cfg_for(out, k), groups, tokenizer, prompts, ids, Path(out))
                trainer.sync.push(0)
                trainer.fit()
                # let batches still in flight finish, so they do not slow the next run down
                left = [r for b in trainer.stream.buffer for p in b.parts for r in p.generate.refs]
                if left:
                    ray.wait(left, num_returns=len(left), timeout=300)
                rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            warm = rows[1:]
            seconds = sum(r["timing/step"] for r in warm)
            mean = lambda key, warm=warm: statistics.mean(r.get(key, float("nan")) for r in warm)  # noqa: E731
            results.append({
                "k": k, "steps_per_s": len(warm) / seconds,
                "completions_per_s": sum(r["rollout/samples"] for r in warm) / seconds,
                "rollout_busy": mean("rollout/busy_fraction"), "learner_busy": mean("learner/busy_fraction"),
                "staleness_mean": mean("rollout/staleness_mean"),
                "staleness_max": max(r["rollout/staleness_max"] for r in warm),
                "reward_wait_s": mean("timing/reward"), "rollout_wait_s": mean("timing/rollout"),
                "load": os.getloadavg()[0],
            })
    finally:
        groups.shutdown()
        if started:
            ray.shutdown()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--staleness", default="0,1,2")
    p.add_argument("--settings", default="default,slow_reward")
    p.add_argument("--reward-delay-ms", type=float, default=300.0, help="the judge's latency per request")
    p.add_argument("--judge-batch", type=int, default=1, help="completions per request to the judge")
    p.add_argument("--judge-concurrency", type=int, default=8, help="requests to the judge in flight")
    p.add_argument("--cache", default=".cache/rlhf_ray")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    a = p.parse_args()
    staleness = [int(k) for k in a.staleness.split(",")]
    table = {}
    for setting in a.settings.split(","):
        extra = list(a.overrides)
        server = None
        if setting == "slow_reward":
            server = SlowRewardServer(a.reward_delay_ms / 1000)
            extra += ["reward=http", f"reward.url={server.url}", "reward.token_env=",
                      f"reward.batch_size={a.judge_batch}", f"reward.max_concurrency={a.judge_concurrency}"]
        try:
            table[setting] = run_setting(extra, staleness, a.steps, Path(a.cache).absolute())
        finally:
            if server is not None:
                server.close()
    print(f"\nsteady state (steps 2..{a.steps}); machine load {os.getloadavg()[0]:.1f} (1-min average); slow reward: "
          f"{a.reward_delay_ms:.0f} ms/request, {a.judge_batch} completion(s)/request, {a.judge_concurrency} in flight")
    print(f"{'setting':>12} {'k':>2} {'steps/s':>8} {'compl/s':>8} {'x sync':>7} {'roll busy':>9} {'learn busy':>10} "
          f"{'stale mean':>10} {'max':>4} {'reward wait':>11} {'load':>5}")
    for setting, rows in table.items():
        sync = next((r["completions_per_s"] for r in rows if r["k"] == 0), float("nan"))
        for r in rows:
            print(f"{setting:>12} {r['k']:>2} {r['steps_per_s']:>8.3f} {r['completions_per_s']:>8.1f} "
                  f"{r['completions_per_s'] / sync:>7.2f} {r['rollout_busy']:>9.2f} {r['learner_busy']:>10.2f} "
                  f"{r['staleness_mean']:>10.2f} {r['staleness_max']:>4.0f} {r['reward_wait_s']:>11.3f} {r['load']:>5.1f}")


if __name__ == "__main__":
    main()
