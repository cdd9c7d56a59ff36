"""``python -m rlhf_ray.evaluate``: compare policies on held-out prompts (generation and scoring).

For every policy (e.g. the SFT model and PPO's final one) a vLLM engine (the rollout worker,
as a Ray worker) completes the held-out prompts twice: sampled as in training
(``rollout.temperature``, ``rollout.n_samples_per_prompt`` per prompt) and greedily. Reported
per decoding: the gold score (the hidden labeler), the share of perfect answers (gold = 1), the
reward model's score when one is given (a reward worker), and for the samples the KL to the
reference policy (sequence KL, k1 estimate ``sum_t log pi(y_t) - log ref(y_t)`` on the policy's
own samples, both at the training temperature; Ziegler et al. 2019), with both logprobs
computed by reference workers (``rlhf_ray.workers.reference``), one per model: no model is
loaded in the driver. The table, ``eval.json`` and ``curves.png`` are ``rlhf_ray.eval_report``'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import ray
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_ray.batch import RolloutSample, pad_samples
from rlhf_ray.config import ConfigError, RewardConfig
from rlhf_ray.eval_report import format_table, mean_se, plot_curves, print_table, read_metrics, table_rows
from rlhf_ray.groups import ReferenceGroup, RewardGroup, RolloutGroup
from rlhf_ray.placement import RolePlan
from rlhf_ray.runtime import reports_user_errors, run_dir
from rlhf_ray.stage import task_file, worker_env, write_json
from rlhf_ray.stage_config import EvalConfig, eval_config_errors, register_configs
from rlhf_ray.workers.rollout import RolloutWorker

log = logging.getLogger("rlhf_ray.evaluate")
register_configs()


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
    groups = {}
    try:
        for name, path, plan in zip(names, cfg.policies, engine_plan(cfg, names), strict=True):
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


def logprob_plan(cfg: EvalConfig, n_models: int) -> list[RolePlan]:
    """After generation: a reference worker per distinct model (the policies and the reference)
    and a reward worker when a reward model scores."""
    c = cfg.cluster
    gpus = 1 if c.device == "cuda" else 0
    plan = [RolePlan(f"eval-logprobs-{i}", 1, c.cpus_per_worker, gpus, c.placement_strategy) for i in range(n_models)]
    if cfg.reward_model_path:
        plan.append(RolePlan("eval-reward", 1, c.cpus_per_worker, gpus, c.placement_strategy))
    return plan


def engine_plan(cfg: EvalConfig, names: list[str]) -> list[RolePlan]:
    c = cfg.cluster
    gpus = cfg.rollout.tensor_parallel_size if c.device == "cuda" else 0
    return [RolePlan(f"eval-{name.replace('/', '-')}", 1, c.cpus_per_worker, gpus, c.placement_strategy)
            for name in names]


def start_logprob_workers(cfg: EvalConfig, paths: list[str], plan: list[RolePlan]) -> dict:
    """A ReferenceGroup per model path (a frozen model that returns response logprobs)."""
    from rlhf_ray.workers.reference import ReferenceWorker

    c = cfg.cluster
    groups = {}
    try:
        for path, role in zip(paths, plan[: len(paths)], strict=True):  # the last role may be the reward worker's
            groups[path] = ReferenceGroup(role, ReferenceWorker, lambda i, worker, path=path: dict(
                name=worker, model_path=path, device=c.device, dtype=cfg.dtype, micro_batch_size=64,
                temperature=cfg.rollout.temperature, threads=c.threads_per_worker, seed=cfg.seed,
            ), namespace=c.namespace, timeout_s=c.call_timeout_s, env=worker_env(c))
        for g in groups.values():
            g.ready()
    except BaseException:
        for g in groups.values():
            g.shutdown()
        raise
    return groups


def sequence_logprobs(group: ReferenceGroup, samples: list[RolloutSample], pad_id: int) -> torch.Tensor:
    """(B,) summed logprob of each sample's response under the group's model."""
    exp = pad_samples(samples, pad_id)
    return group.compute_logprobs(exp).sum(-1)


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
                    gold_fn, reward_model, kl: list[float]) -> dict:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    sampled_prompts = [prompts[s.prompt_index] for s in done.sampled]
    sampled = score_texts(sampled_prompts, [decode(s.response_ids) for s in done.sampled], gold_fn, reward_model)
    sampled["kl"], sampled["kl_se"] = mean_se(kl)
    sampled["response_len"] = sum(len(s.response_ids) for s in done.sampled) / len(done.sampled)
    greedy = score_texts(prompts, [decode(ids) for ids in done.greedy], gold_fn, reward_model)
    greedy["response_len"] = sum(len(ids) for ids in done.greedy) / len(done.greedy)
    examples = [{"prompt": p, "greedy": decode(ids)} for p, ids in list(zip(prompts, done.greedy, strict=True))[:5]]
    return {"path": path, "sampled": sampled, "greedy": greedy, "examples": examples}


def load_prompts(cfg: EvalConfig) -> list[str]:
    from rlhf_ray.data import load_prompt_dataset

    path = cfg.prompts_file or task_file(cfg.data_seed, cfg.cache_dir, "prompts_eval")
    prompts = list(load_prompt_dataset(path, prompt_key=cfg.prompt_key)["prompt"])
    return prompts[: cfg.max_prompts] if cfg.max_prompts else prompts


def check_models(cfg: EvalConfig) -> None:
    """Before any worker starts: every model path holds a model."""
    from rlhf_ray.models import check_model_dir

    for i, path in enumerate(cfg.policies):
        check_model_dir(path, f"policies[{i}]", tokenizer=i == 0)
    if cfg.reference_path:
        check_model_dir(cfg.reference_path, "reference_path")
    if cfg.reward_model_path:
        check_model_dir(cfg.reward_model_path, "reward_model_path")


def score_all(cfg: EvalConfig, names: list[str], completions: dict[str, Completions], prompts: list[str],
              tokenizer, reference: str) -> dict[str, dict]:
    """Gold, reward model (a reward worker) and KL (reference workers) of every policy's completions."""
    from rlhf_ray.workers.reward import RewardWorker, load_function

    c = cfg.cluster
    paths = list(dict.fromkeys([*cfg.policies, reference]))
    plan = logprob_plan(cfg, len(paths))
    gold_fn = load_function(cfg.gold_function) if cfg.gold_function else None
    groups = start_logprob_workers(cfg, paths, plan)
    reward = None
    try:
        if cfg.reward_model_path:
            rm_cfg = RewardConfig(kind="model", model_path=cfg.reward_model_path, gold_function="")
            reward = RewardGroup(plan[-1], RewardWorker, lambda i, worker: dict(
                name=worker, cfg=rm_cfg, threads=c.threads_per_worker, seed=cfg.seed,
            ), namespace=c.namespace, timeout_s=c.call_timeout_s, env=worker_env(c))
        reward_model = (lambda p, t: reward.score(p, t)["reward"]) if reward else None
        results = {}
        for name, path in zip(names, cfg.policies, strict=True):
            sampled = completions[name].sampled
            ref = sequence_logprobs(groups[reference], sampled, tokenizer.pad_token_id)
            kl = (sequence_logprobs(groups[path], sampled, tokenizer.pad_token_id) - ref).tolist()
            results[name] = evaluate_policy(cfg, path, completions[name], prompts, tokenizer, gold_fn, reward_model, kl)
        return results
    finally:
        for g in [*groups.values(), *([reward] if reward else [])]:
            g.shutdown()


def run(cfg: EvalConfig, out_dir: Path, show: bool = True) -> dict:
    """Evaluate every policy, write ``eval.json`` (and ``curves.png``), print the table if ``show``."""
    from rlhf_ray.data import tokenize_prompts_with_index
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.runtime import connect

    validate_eval(cfg)
    check_models(cfg)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = policy_names(cfg)
    tokenizer = load_tokenizer(cfg.policies[0])
    all_prompts = load_prompts(cfg)
    prompt_ids, kept = tokenize_prompts_with_index(tokenizer, all_prompts, cfg.max_prompt_len, "truncate")
    prompts = [all_prompts[i] for i in kept]
    reference = cfg.reference_path or cfg.policies[0]
    n_models = len(set([*cfg.policies, reference]))
    started = connect(cfg.cluster, engine_plan(cfg, names), logprob_plan(cfg, n_models))
    try:
        completions = generate_all(cfg, names, prompt_ids)
        results = score_all(cfg, names, completions, prompts, tokenizer, reference)
    finally:
        if started:
            ray.shutdown()
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
@reports_user_errors
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = validate_eval(OmegaConf.to_object(dcfg))
    run(cfg, run_dir(cfg.output_dir))


if __name__ == "__main__":
    main()

