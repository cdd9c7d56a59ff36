"""``python -m rlhf_ray.evaluate``: compare policies on held-out prompts and plot a run's curves.

For every policy (e.g. the SFT model and PPO's final one) a vLLM engine (the rollout worker,
as a Ray worker) completes the held-out prompts twice: sampled as in training
(``rollout.temperature``, ``rollout.n_samples_per_prompt`` per prompt) and greedily. Reported
per decoding: the gold score (the hidden labeler), the share of perfect answers (gold = 1), the
reward model's score when one is given, and for the samples the KL to the reference policy
(sequence KL, k1 estimate ``sum_t log pi(y_t) - log ref(y_t)`` on the policy's own samples,
both at the training temperature; Ziegler et al. 2019). The table is printed and saved with
the raw numbers as ``eval.json``; ``metrics_file`` (a run's ``metrics.jsonl``) is plotted as
``curves.png``: proxy reward (``reward/mean``), gold (``reward/gold``) and KL per step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import ray
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_ray.batch import RolloutSample, pad_samples
from rlhf_ray.config import ConfigError, RewardConfig
from rlhf_ray.groups import RolloutGroup
from rlhf_ray.placement import RolePlan
from rlhf_ray.stage import ensure_ray, output_dir, task_file, worker_env, write_json
from rlhf_ray.stage_config import EvalConfig, eval_config_errors, register_configs
from rlhf_ray.workers.rollout import RolloutWorker

log = logging.getLogger("rlhf_ray.evaluate")
register_configs()

CURVES = (("reward/mean", "proxy reward (reward model)"), ("reward/gold", "gold score"), ("kl/mean", "KL to reference"))


class EvalRolloutWorker(RolloutWorker):
    """The rollout engine, plus greedy decoding (evaluation only)."""

    def generate_greedy(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=0.0, max_tokens=self.cfg.max_new_tokens)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]


@dataclass
class Completions:
    """One policy's completions of the held-out prompts."""

    sampled: list[RolloutSample]  # n per prompt, contiguous
    greedy: list[list[int]]  # one per prompt


def policy_names(cfg: EvalConfig) -> list[str]:
    if cfg.names:
        return list(cfg.names)
    names = [Path(p).name for p in cfg.policies]
    if len(set(names)) < len(names):
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p in cfg.policies]
    return names


def generate_all(cfg: EvalConfig, names: list[str], prompt_ids: list[list[int]]) -> dict[str, Completions]:
    """One engine per policy, all started at once, each stopped as soon as it is done."""
    c = cfg.cluster
    env = dict(worker_env(c), VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(cfg.rollout.kv_cache_gb))
    gpus = cfg.rollout.tensor_parallel_size if c.device == "cuda" else 0
    groups = {}
    try:
        for name, path in zip(names, cfg.policies, strict=True):
            plan = RolePlan(f"eval-{name.replace('/', '-')}", 1, c.cpus_per_worker, gpus, c.placement_strategy)
            groups[name] = RolloutGroup(plan, EvalRolloutWorker, lambda i, worker, path=path: dict(
                name=worker, model_path=path, cfg=cfg.rollout, device=c.device, dtype=cfg.dtype,
                max_model_len=cfg.max_prompt_len + cfg.rollout.max_new_tokens, seed=cfg.seed,
            ), namespace=c.namespace, timeout_s=c.call_timeout_s, env=env)
        out = {}
        for name in names:
            group = groups[name]
            sampled = group.generate(prompt_ids, seed=cfg.seed, min_version=0)
            greedy = group.get([group.workers[0].generate_greedy.remote(prompt_ids)], "generate_greedy")[0]
            out[name] = Completions(sampled, greedy)
            groups.pop(name).shutdown()
        return out
    finally:
        for group in groups.values():
            group.shutdown()


@torch.no_grad()
def sequence_logprobs(model_path: str, samples: list[RolloutSample], pad_id: int, temperature: float,
                      dtype: str = "float32", micro_batch_size: int = 64) -> torch.Tensor:
    """(B,) summed logprob of each sample's response under the model at ``model_path``."""
    from rlhf_ray.models import load_causal_lm
    from rlhf_ray.workers.common import torch_dtype
    from rlhf_ray.workers.forward import batched, response_logprobs

    model = load_causal_lm(model_path, dtype=torch_dtype(dtype)).eval()
    exp = pad_samples(samples, pad_id)
    logprobs = batched(lambda s, m, A: response_logprobs(model, s, m, A, temperature)[0], exp, micro_batch_size)
    return (logprobs * exp.response_mask).sum(-1)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var / len(finite))


def score_texts(prompts: list[str], texts: list[str], gold_fn, reward_model) -> dict[str, float]:
    """Gold mean (+ standard error), share of perfect answers, reward-model mean."""
    out: dict[str, float] = {}
    if gold_fn is not None:
        gold = [float(g) for g in gold_fn(prompts, texts)]
        out["gold"], out["gold_se"] = mean_se(gold)
        out["exact"] = sum(g == 1.0 for g in gold) / len(gold)
    if reward_model is not None:
        out["reward_model"], out["reward_model_se"] = mean_se([float(r) for r in reward_model(prompts, texts)])
    return out


def evaluate_policy(cfg: EvalConfig, path: str, done: Completions, prompts: list[str], tokenizer,
                    gold_fn, reward_model, reference_logprobs) -> dict:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    sampled_prompts = [prompts[s.prompt_index] for s in done.sampled]
    sampled = score_texts(sampled_prompts, [decode(s.response_ids) for s in done.sampled], gold_fn, reward_model)
    policy = sequence_logprobs(path, done.sampled, tokenizer.pad_token_id, cfg.rollout.temperature, cfg.dtype)
    kl = (policy - reference_logprobs(done.sampled)).tolist()
    sampled["kl"], sampled["kl_se"] = mean_se(kl)
    sampled["response_len"] = sum(len(s.response_ids) for s in done.sampled) / len(done.sampled)
    greedy = score_texts(prompts, [decode(ids) for ids in done.greedy], gold_fn, reward_model)
    greedy["response_len"] = sum(len(ids) for ids in done.greedy) / len(done.greedy)
    examples = [{"prompt": p, "greedy": decode(ids)} for p, ids in list(zip(prompts, done.greedy, strict=True))[:5]]
    return {"path": path, "sampled": sampled, "greedy": greedy, "examples": examples}


def table_rows(results: dict[str, dict], temperature: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (numbers formatted)."""
    t = f"T={temperature:g}"
    header = ["policy", f"gold {t}", f"exact {t}", "gold greedy", "exact greedy"]
    with_rm = any("reward_model" in r["sampled"] for r in results.values())
    if with_rm:
        header += [f"RM {t}", "RM greedy"]
    header += [f"KL {t}", "len"]
    rows = []
    for name, r in results.items():
        s, g = r["sampled"], r["greedy"]
        row = [name, f"{s.get('gold', math.nan):.3f} ± {s.get('gold_se', math.nan):.3f}", f"{s.get('exact', math.nan):.3f}",
               f"{g.get('gold', math.nan):.3f}", f"{g.get('exact', math.nan):.3f}"]
        if with_rm:
            row += [f"{s.get('reward_model', math.nan):.3f}", f"{g.get('reward_model', math.nan):.3f}"]
        row += [f"{s['kl']:.3f}", f"{s['response_len']:.1f}"]
        rows.append(row)
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table (columns padded to their widest cell)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def print_table(header: list[str], rows: list[list[str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich ships with ray[default]
        print(title + "\n" + format_table(header, rows))
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.width = max(console.width, 132)  # no wrapped cells in logs and narrow captures
    console.print(table)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a run's metrics.jsonl (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def rolling_mean(values: list[float], k: int) -> list[float]:
    """Mean of the last ``k`` values at each position (fewer at the start)."""
    return [sum(values[max(0, i - k + 1) : i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(values))]


def plot_curves(rows: list[dict], out: Path, title: str = "", smooth: int = 10) -> Path:
    """Proxy reward, gold and KL per step (with a rolling mean), one panel each, to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.3))
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker=".", linewidth=0.6, alpha=0.35, label="per step")
            ax.plot(steps, rolling_mean(list(values), smooth), linewidth=2, label=f"mean of {smooth}")
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def load_prompts(cfg: EvalConfig) -> list[str]:
    from rlhf_ray.data import load_prompt_dataset

    path = cfg.prompts_file or task_file(cfg.data_seed, cfg.cache_dir, "prompts_eval")
    prompts = list(load_prompt_dataset(path, prompt_key=cfg.prompt_key)["prompt"])
    return prompts[: cfg.max_prompts] if cfg.max_prompts else prompts


def run(cfg: EvalConfig, out_dir: Path, show: bool = True) -> dict:
    """Evaluate every policy, write ``eval.json`` (and ``curves.png``), print the table if ``show``."""
    from rlhf_ray.data import tokenize_prompts_with_index
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.workers.reward import ModelScorer, load_function

    validate_eval(cfg)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = policy_names(cfg)
    tokenizer = load_tokenizer(cfg.policies[0])
    all_prompts = load_prompts(cfg)
    prompt_ids, kept = tokenize_prompts_with_index(tokenizer, all_prompts, cfg.max_prompt_len, "truncate")
    prompts = [all_prompts[i] for i in kept]
    started = ensure_ray(cfg.cluster, len(names) * cfg.cluster.cpus_per_worker)
    try:
        completions = generate_all(cfg, names, prompt_ids)
    finally:
        if started:
            ray.shutdown()
    gold_fn = load_function(cfg.gold_function) if cfg.gold_function else None
    reward_model = (ModelScorer(RewardConfig(kind="model", model_path=cfg.reward_model_path))
                    if cfg.reward_model_path else None)
    reference = cfg.reference_path or cfg.policies[0]

    def reference_logprobs(samples: list[RolloutSample]) -> torch.Tensor:
        return sequence_logprobs(reference, samples, tokenizer.pad_token_id, cfg.rollout.temperature, cfg.dtype)

    results = {name: evaluate_policy(cfg, path, completions[name], prompts, tokenizer, gold_fn, reward_model,
                                     reference_logprobs)
               for name, path in zip(names, cfg.policies, strict=True)}
    header, rows = table_rows(results, cfg.rollout.temperature)
    ref_name = names[cfg.policies.index(reference)] if reference in cfg.policies else Path(reference).name
    title = (f"held-out evaluation: {len(prompts)} prompts, {cfg.rollout.n_samples_per_prompt} samples each "
             f"at T={cfg.rollout.temperature:g}, and greedy; KL to {ref_name}")
    report = {"policies": results, "reference": reference, "reward_model": cfg.reward_model_path,
              "prompts": len(prompts), "samples_per_prompt": cfg.rollout.n_samples_per_prompt,
              "temperature": cfg.rollout.temperature, "title": title, "header": header, "rows": rows,
              "table": format_table(header, rows)}
    if cfg.metrics_file:
        report["curves"] = str(plot_curves(read_metrics(cfg.metrics_file), out_dir / "curves.png",
                                           title=str(Path(cfg.metrics_file).parent.name)))
    report["seconds"] = time.perf_counter() - start
    write_json(out_dir / "eval.json", report)
    if show:
        print_table(header, rows, title)
    return report


def validate_eval(cfg: EvalConfig) -> EvalConfig:
    errors = eval_config_errors("", cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = validate_eval(OmegaConf.to_object(dcfg))
    run(cfg, output_dir(cfg.output_dir))


if __name__ == "__main__":
    main()

