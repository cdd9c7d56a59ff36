"""Critic rank: DeepSpeed ZeRO token-value model that computes values and value updates."""

from __future__ import annotations

import torch

from rlhf_ray.algo import value_loss
from rlhf_ray.batch import Experience
from rlhf_ray.config import AlgoConfig
from rlhf_ray.models import load_value_model
from rlhf_ray.workers.deepspeed_rank import DeepSpeedRank
from rlhf_ray.workers.forward import batched, response_values


class CriticWorker(DeepSpeedRank):
    role = "critic"

    def __init__(self, *args, algo: AlgoConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.algo = algo

    def build_model(self) -> torch.nn.Module:
        return load_value_model(self.model_path, dtype=self.torch_dtype, trust_remote_code=self.trust_remote_code)

    def compute_values(self, exp: Experience) -> torch.Tensor:
        """(B, A) values of the states before each response token."""
        self.engine.eval()
        A = exp.response_mask.shape[1]
        exp = exp.to(self.device)

        def fn(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return response_values(self.engine, seq, mask, A)

        return batched(fn, exp.sequences, exp.attention_mask, self.cfg.micro_batch_size) * exp.response_mask.cpu()

    def _loss(self, batch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        A = batch.response_mask.shape[1]
        values = response_values(self.engine, batch.sequences, batch.attention_mask, A)
        mask = batch.response_mask * batch.valid[:, None]
        clip = self.algo.value_clip_eps or None
        loss, metrics = value_loss(values, batch.values, batch.returns, mask, clip_eps=clip, agg_mode=self.algo.loss_agg)
        return loss, metrics

    def update(self, exp: Experience) -> dict[str, float]:
        """Value epochs on this rank's shard; returns ``critic/*`` metrics."""
        return self.train_on(exp, self._loss, self.algo.epochs, self.algo.minibatches)
