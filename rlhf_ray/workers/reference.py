"""Reference worker: the frozen initial policy, computing reference logprobs for the KL term."""

from __future__ import annotations

import torch

from rlhf_ray.batch import Experience
from rlhf_ray.models import load_causal_lm
from rlhf_ray.workers.common import device_for, setup_process, torch_dtype
from rlhf_ray.workers.forward import batched, response_logprobs


class ReferenceWorker:
    def __init__(
        self, name: str, model_path: str, *, device: str = "cpu", dtype: str = "float32",
        micro_batch_size: int = 16, max_tokens_per_micro_batch: int = 0, temperature: float = 1.0,
        threads: int = 1, seed: int = 0, trust_remote_code: bool = False,
    ):
        setup_process(threads, seed)
        self.name, self.micro_batch_size, self.temperature = name, micro_batch_size, temperature
        self.max_tokens = max_tokens_per_micro_batch
        self.device = device_for(device)
        self.model = load_causal_lm(model_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval().requires_grad_(False)

    def __repr__(self) -> str:
        return f"ReferenceWorker({self.name})"

    def compute_logprobs(self, exp: Experience) -> torch.Tensor:
        """(B, A) reference logprobs of the response tokens; the samples of one prompt share its
        forward (``forward.shared_prompt_logits``: a plain module, so no peer rank has to run
        as many forwards as this one)."""
        exp = exp.to(self.device)

        def fn(seq: torch.Tensor, mask: torch.Tensor, A: int) -> torch.Tensor:
            return response_logprobs(self.model, seq, mask, A, self.temperature, share_prompts=True)[0]

        return batched(fn, exp, self.micro_batch_size, self.max_tokens) * exp.response_mask.cpu()
