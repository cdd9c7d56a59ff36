"""Where step metrics go: ``metrics.jsonl`` (one object per step), TensorBoard event files,
Ray's metrics endpoint (``ray.util.metrics`` gauges, shown by the dashboard/Grafana), and a
console progress bar with ETA."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

# Keys exported as Ray gauges (``ray_rlhf_<key with / -> _>`` on the Prometheus endpoint).
RAY_GAUGE_KEYS = (
    "step", "reward/mean", "reward/gold", "kl/mean", "policy/loss", "critic/loss",
    "rollout/weight_version", "rollout/tokens_per_s", "rollout/samples", "timing/step",
)


@contextmanager
def timed(timings: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[f"timing/{phase}"] = time.perf_counter() - start


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 ray_metrics: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.gauges = _ray_gauges() if ray_metrics else {}
        self.bar = tqdm(total=total_steps, initial=start_step, desc="rl", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        for k, gauge in self.gauges.items():
            if isinstance(row.get(k), int | float):
                gauge.set(row[k], tags={"role": "driver"})
        self.bar.update(1)
        shown = {k.split("/")[-1] if k.startswith("reward/") else k: row.get(k)
                 for k in ("reward/mean", "reward/gold", "kl/mean")}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if isinstance(v, float)})

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _ray_gauges() -> dict:
    import ray

    if not ray.is_initialized():
        return {}
    from ray.util.metrics import Gauge

    return {
        k: Gauge("rlhf_" + k.replace("/", "_"), description=f"rlhf_ray {k}", tag_keys=("role",))
        for k in RAY_GAUGE_KEYS
    }
