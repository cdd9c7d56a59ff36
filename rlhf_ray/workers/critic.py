"""Critic rank: DeepSpeed ZeRO token-value model that computes values and value updates."""

from __future__ import annotations

import torch

from rlhf_ray.algo import LossNormalizer, value_loss
from rlhf_ray.batch import Experience
from rlhf_ray.config import AlgoConfig
from rlhf_ray.models import load_value_model
from rlhf_ray.workers.deepspeed_rank import DeepSpeedRank
from rlhf_ray.workers.forward import response_values


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
        exp = exp.to(self.device)

        def fn(seq: torch.Tensor, mask: torch.Tensor, A: int) -> torch.Tensor:
            return response_values(self.engine, seq, mask, A)

        return self.forward_batched(fn, exp) * exp.response_mask.cpu()

    def _loss(self, batch: Experience, norm: LossNormalizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        A = batch.response_mask.shape[1]
        values = response_values(self.engine, batch.sequences, batch.attention_mask, A)
        mask = batch.response_mask * batch.valid[:, None]
        clip = self.algo.value_clip_eps or None
        return value_loss(values, batch.values, batch.returns, mask, clip_eps=clip, agg_mode=self.algo.agg_mode,
                          norm=norm)

    def update(self, exp: Experience) -> dict[str, float]:
        """Value epochs on this rank's shard (the same schedule as the policy's); returns ``critic/*`` metrics."""
        epochs, minibatches = self.algo.schedule
        return self.train_on(exp, self._loss, epochs, minibatches)
