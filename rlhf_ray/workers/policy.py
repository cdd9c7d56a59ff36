"""Policy learner rank: DeepSpeed ZeRO policy that computes logprobs, runs the policy update
of the configured algorithm (its loss from the algorithm table, with the off-policy IS
correction between vLLM's behaviour logprobs and the learner's), and streams its weights to
the rollout engines.

With LoRA (``model.lora.rank > 0``) the rank trains PEFT adapters on a frozen base; the same
module with its adapters disabled is the reference policy (``compute_ref_logprobs``), and the
engines receive the merged weights under the base model's names, or with
``model.lora.sync=adapter`` only the adapter tensors, which they serve as a vLLM LoRA adapter
(``models.lora``)."""

from __future__ import annotations

import torch

from rlhf_ray.algo import (
    LossNormalizer,
    a2c_policy_loss,
    aggregate_loss,
    cispo_policy_loss,
    gspo_policy_loss,
    importance_weights,
    kl_loss,
    ppo_policy_loss,
    resolve_off_policy_mode,
)
from rlhf_ray.batch import Experience
from rlhf_ray.config import AlgoConfig, LoRAConfig
from rlhf_ray.models import load_causal_lm
from rlhf_ray.models.lora import adapter_config, adapter_weights, apply_lora, merged_weights
from rlhf_ray.sync.buckets import TensorMeta, pack
from rlhf_ray.sync.group import create_group, host_store, node_ip, send_to_ranks
from rlhf_ray.workers.deepspeed_rank import DeepSpeedRank
from rlhf_ray.workers.forward import response_logprobs

POLICY_LOSSES = {"ppo": ppo_policy_loss, "gspo": gspo_policy_loss, "cispo": cispo_policy_loss}


class PolicyWorker(DeepSpeedRank):
    role = "policy"

    def __init__(self, *args, algo: AlgoConfig, temperature: float = 1.0, max_staleness: int = 0,
                 lora: LoRAConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.algo, self.temperature, self.lora = algo, temperature, lora or LoRAConfig()
        self.off_policy = resolve_off_policy_mode(algo.off_policy_correction, max_staleness)
        self.sync_group = None

    def build_model(self) -> torch.nn.Module:
        model = load_causal_lm(self.model_path, dtype=self.torch_dtype, trust_remote_code=self.trust_remote_code)
        return apply_lora(model, self.lora) if self.lora.rank else model

    def compute_ref_logprobs(self, exp: Experience) -> torch.Tensor:
        """(B, A) logprobs under the base model (LoRA adapters disabled): the reference policy."""
        with self.engine.module.disable_adapter():
            return self.compute_logprobs(exp)

    def _weights(self) -> dict[str, torch.Tensor]:
        """What the engines load, by HF name: the parameters, or with LoRA the merged weights
        (``model.lora.sync=merged``) or the adapter tensors alone (``adapter``)."""
        if self.lora.rank and self.lora.sync == "adapter":
            return adapter_weights(self.engine.module)
        if self.lora.rank:
            return merged_weights(self.engine.module)
        return dict(self.engine.module.named_parameters())

    def adapter_config(self) -> dict | None:
        """The PEFT adapter config the engines serve the synced adapter with (``None``: the
        engines load full weights)."""
        return adapter_config(self.engine.module) if self.lora.rank and self.lora.sync == "adapter" else None

    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        """(B, A) logprobs of the response tokens under the current weights."""
        self.engine.eval()
        exp = exp.to(self.device)

        def fn(seq: torch.Tensor, mask: torch.Tensor, A: int) -> torch.Tensor:
            return response_logprobs(self.engine, seq, mask, A, self.temperature)[0]

        return self.forward_batched(fn, exp) * exp.response_mask.cpu()

    def _loss(self, batch: Experience, norm: LossNormalizer, kl_coef: float):
        """This micro-batch's share of the policy loss: the algorithm's policy loss (from the
        algorithm table) weighted by the off-policy IS weights, minus the entropy bonus, plus
        the KL term when it is a loss. ``old_logprobs is None`` = a single on-policy pass: the
        detached current logprobs are the old ones."""
        a = self.algo
        agg = a.agg_mode
        logprobs, entropy = response_logprobs(
            self.engine, batch.sequences, batch.attention_mask, batch.response_mask.shape[1], self.temperature,
            with_entropy=True, share_prompts=self.cfg.zero_stage < 3,  # see forward.shared_prompt_logits
        )
        mask = batch.response_mask * batch.valid[:, None]
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        weights, metrics = importance_weights(old, batch.rollout_logprobs, mask, self.off_policy,
                                              a.off_policy_cap, a.off_policy_level, norm)
        kind = a.spec.policy_loss
        if kind == "pg":  # no ratio: on-policy by the table's epoch rule
            loss, pg_metrics = a2c_policy_loss(logprobs, batch.advantages, mask, agg, norm, weights)
        else:
            loss, pg_metrics = POLICY_LOSSES[kind](
                logprobs, old, batch.advantages, mask, clip_eps=a.clip_eps, clip_eps_high=a.clip_eps_high or None,
                agg_mode=agg, norm=norm, is_weights=weights,
            )
        metrics.update(pg_metrics, pg_loss=loss.detach())
        entropy_mean = aggregate_loss(entropy, mask, agg, norm)
        metrics["entropy"] = entropy_mean.detach()
        if a.entropy_coef:
            loss = loss - a.entropy_coef * entropy_mean
        if not a.kl_in_reward and kl_coef > 0:
            kl = kl_loss(logprobs, batch.ref_logprobs, mask, kind=a.kl_estimator, agg_mode=agg,
                         old_logprobs=old, norm=norm)
            metrics["kl_loss"] = kl.detach()
            loss = loss + kl_coef * kl
        return loss, metrics

    def update(self, exp: Experience, kl_coef: float) -> dict[str, float]:
        """Policy epochs on this rank's shard (the algorithm table's schedule); returns
        ``policy/*`` and ``rollout/is_*``/``rollout/mismatch_kl`` metrics."""
        epochs, minibatches = self.algo.schedule
        if exp.old_logprobs is None and (epochs, minibatches) != (1, 1):
            raise ValueError(
                f"{self!r}: experience without old_logprobs is a single on-policy pass, but the update runs "
                f"{epochs} epoch(s) of {minibatches} minibatch(es) (algo.epochs/algo.minibatches): compute them"
            )
        return self.train_on(exp, lambda b, norm: self._loss(b, norm, kl_coef), epochs, minibatches)

    # ---- weight sync (rlhf_ray.sync): every rank joins the gathers, rank 0 sends
    def weight_manifest(self) -> list[TensorMeta]:
        return [
            TensorMeta(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
            for name, p in self._weights().items()
        ]

    def weight_group_address(self, world_size: int, timeout_s: float = 300.0) -> tuple[str, int]:
        """Host the weight-sync group's store (this rank is its rank 0); engines join it."""
        host = node_ip()
        self._sync_store = host_store(host, world_size, timeout_s)
        return host, self._sync_store.port

    def init_weight_group(self, world_size: int, timeout_s: float = 300.0) -> None:
        self.sync_group = create_group(self._sync_store, 0, world_size, self.device_kind, timeout_s)
        self.sync_ranks = list(range(1, world_size))

    def send_weights(self, plan: list[list[TensorMeta]], use_object_store: bool) -> list:
        """Stream every bucket of ``plan``; returns object refs for the object-store backend, the
        engine ranks that could not be reached (dead) for the collective one."""
        import deepspeed
        import ray

        params = self._weights()
        refs, unreached = [], set()
        for bucket in plan:
            tensors = [params[m.name] for m in bucket]
            gathered = deepspeed.zero.GatheredParameters(tensors, modifier_rank=None, enabled=self.cfg.zero_stage == 3)
            with gathered, torch.no_grad():
                if self.rank != 0:
                    continue
                flat = pack([t.data for t in tensors])
                if use_object_store:
                    refs.append(ray.put(flat.cpu()))
                else:
                    send_to_ranks(self.sync_group, flat, self.sync_ranks, unreached)
        return refs if use_object_store else sorted(unreached)

    def save_hf(self, path: str) -> None:
        """The HF model (safetensors); with LoRA the merged model at ``path`` (loads as the base
        architecture, in transformers and vLLM alike) and the PEFT adapter at ``path/adapter``."""
        if not self.lora.rank:
            return super().save_hf(path)
        if self.rank == 0:
            from pathlib import Path

            from rlhf_ray import storage

            module = self.engine.module
            merged = {k: v.detach().cpu().clone() for k, v in merged_weights(module).items()}
            with storage.local_dir(path) as local:
                module.save_pretrained(str(Path(local, "adapter")))
                module.get_base_model().save_pretrained(local, state_dict=merged)
        return None
