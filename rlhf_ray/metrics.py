"""Where step metrics go: ``metrics.jsonl`` (one object per step), TensorBoard event files,
Ray's metrics endpoint (``ray.util.metrics`` gauges, shown by the dashboard/Grafana), optionally
Weights & Biases, and a console progress bar with ETA."""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

# Keys exported as Ray gauges (``ray_rlhf_<key with / -> _>`` on the Prometheus endpoint).
RAY_GAUGE_KEYS = (
    "step", "reward/mean", "reward/gold", "kl/mean", "policy/loss", "critic/loss",
    "rollout/weight_version", "rollout/tokens_per_s", "rollout/samples", "rollout/tokens",
    "timing/step", "sync/seconds", "reward/model_version", "reward_model/heldout_accuracy",
    # actor-learner (trainer.max_staleness): who is busy, how full the pipeline is, how old the data
    "rollout/busy_fraction", "learner/busy_fraction", "rollout/buffer_fill", "rollout/staleness_mean", "rollout/staleness_max", "rollout/dropped_samples",
)
# Every ``timing/<phase>`` key also goes to ``ray_rlhf_phase_seconds{phase=<phase>}``, and
# ``rollout/weight_version/<engine>`` keys (one per engine, as reported after a sync) to
# ``ray_rlhf_engine_weight_version{engine=<engine>}``.
ENGINE_VERSION_PREFIX = "rollout/weight_version/"
DRIVER = {"role": "driver"}

_active_gauges: RayGauges | None = None


@contextmanager
def timed(timings: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[f"timing/{phase}"] = time.perf_counter() - start


def set_samples_in_flight(n: int) -> None:
    """Samples being generated right now (the rollout stream sets it as batches are submitted
    and come back); a no-op unless a ``MetricsLogger`` with Ray gauges is open."""
    if _active_gauges is not None:
        _active_gauges.in_flight.set(n, tags=DRIVER)


class RayGauges:
    """The driver's ``ray.util.metrics`` gauges, exported by the node's metrics agent."""

    def __init__(self):
        from ray.util.metrics import Gauge

        self.scalars = {
            k: Gauge("rlhf_" + k.replace("/", "_"), description=f"rlhf_ray {k}", tag_keys=("role",))
            for k in RAY_GAUGE_KEYS
        }
        self.phase = Gauge("rlhf_phase_seconds", description="rlhf_ray seconds of each phase of the last step",
                           tag_keys=("role", "phase"))
        self.engine_version = Gauge("rlhf_engine_weight_version", description="rlhf_ray weight version per engine",
                                    tag_keys=("role", "engine"))
        self.in_flight = Gauge("rlhf_samples_in_flight", description="rlhf_ray samples being generated",
                               tag_keys=("role",))

    def log(self, row: dict) -> None:
        for k, v in row.items():
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if k in self.scalars:
                self.scalars[k].set(v, tags=DRIVER)
            if k.startswith("timing/") and k != "timing/step":
                self.phase.set(v, tags={**DRIVER, "phase": k.removeprefix("timing/")})
            elif k.startswith(ENGINE_VERSION_PREFIX):
                self.engine_version.set(v, tags={**DRIVER, "engine": k.removeprefix(ENGINE_VERSION_PREFIX)})


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 ray_metrics: bool = True, wandb_config: dict | None = None):
        """``wandb_config``: the (redacted) run config; given = also log to Weights & Biases."""
        global _active_gauges
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        _drop_rows_after(path, start_step)  # rows of steps a resumed run will redo
        self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.wandb = _wandb_run(self.run_dir, wandb_config) if wandb_config is not None else None
        self.gauges = _ray_gauges() if ray_metrics else None
        if self.gauges is not None:
            _active_gauges = self.gauges
        self.bar = tqdm(total=total_steps, initial=start_step, desc="rl", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        finite = {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in finite.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(finite, step=step)
        if self.gauges is not None:
            self.gauges.log(row)
        self.bar.update(1)
        shown = {k.split("/")[-1] if k.startswith("reward/") else k: row.get(k)
                 for k in ("reward/mean", "reward/gold", "kl/mean")}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if isinstance(v, float)})

    def close(self) -> None:
        global _active_gauges
        if _active_gauges is self.gauges:
            _active_gauges = None
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _ray_gauges() -> RayGauges | None:
    import ray

    return RayGauges() if ray.is_initialized() else None


def _wandb_run(run_dir: Path, config: dict):
    """A W&B run in ``run_dir`` (project ``$WANDB_PROJECT``, default rlhf_ray; $WANDB_RUN_ID resumes a run)."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("trainer.wandb=true needs the wandb package: pip install wandb") from e
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf_ray"), name=run_dir.name, dir=str(run_dir),
                      config=config, resume="allow")
