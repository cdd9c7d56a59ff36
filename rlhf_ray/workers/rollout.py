"""Rollout worker: one vLLM engine that generates completions with their logprobs.

The engine runs in this worker's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` on CPU, set by
the group) so weights can be loaded into it directly; with tensor parallelism vLLM starts its
own workers and the weight-sync extension runs in each of them. Every sample carries the
``weight_version`` of the engine that made it, and an engine refuses to generate from weights
older than the trainer asks for.
"""

from __future__ import annotations

import os

from rlhf_ray.batch import RolloutSample
from rlhf_ray.config import RolloutConfig
from rlhf_ray.faults import maybe_fail
from rlhf_ray.sampling import sampling_params
from rlhf_ray.sync.buckets import TensorMeta

RECEIVER = "rlhf_ray.sync.receiver.WeightReceiver"


class StaleWeightsError(RuntimeError):
    """An engine was asked to generate with weights older than the trainer's."""


class RolloutWorker:
    def __init__(
        self,
        name: str,
        model_path: str,
        cfg: RolloutConfig,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_model_len: int = 128,
        seed: int = 0,
        trust_remote_code: bool = False,
        weight_version: int = 0,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
        if cfg.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.name, self.cfg, self.model_path = name, cfg, model_path
        extra = {"gpu_memory_utilization": cfg.gpu_memory_utilization} if device == "cuda" else {}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=cfg.enforce_eager,
            max_model_len=max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            worker_extension_cls=RECEIVER,
            # logprobs after temperature/top-p, i.e. of the distribution actually sampled from
            logprobs_mode="processed_logprobs",
            **extra,
        )
        self.version = weight_version

    def __repr__(self) -> str:
        return f"RolloutWorker({self.name})"

    def weight_version(self) -> int:
        return self.version

    def generate(
        self, prompt_ids: list[list[int]], prompt_indices: list[int], *, seed: int, min_version: int,
        n: int | None = None,
    ) -> list[RolloutSample]:
        """``n`` (default ``n_samples_per_prompt``) completions of each prompt, contiguous."""
        if self.version < min_version:
            raise StaleWeightsError(f"{self.name} holds weights v{self.version}, trainer is at v{min_version}")
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        params = [sampling_params(self.cfg, self.model_path, seed=seed + i, n=n) for i in prompt_indices]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        maybe_fail(self.name, "generate")
        samples = []
        for out, index, ids in zip(outputs, prompt_indices, prompt_ids, strict=True):
            for c in out.outputs:
                token_ids = list(c.token_ids)
                logprobs = [lp[t].logprob for lp, t in zip(c.logprobs, token_ids, strict=True)]
                samples.append(
                    RolloutSample(index, list(ids), token_ids, logprobs, self.version, self.name, str(c.finish_reason))
                )
        return samples

    def score_tokens(self, sequences: list[list[int]]) -> list[list[float]]:
        """vLLM's logprob of every token after the first of each sequence (the spot check)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=self.cfg.temperature)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [
            [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], seq[1:], strict=True)]
            for out, seq in zip(outputs, sequences, strict=True)
        ]

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc("rlhf_init_weight_group", args=(host, port, rank_offset, world_size))

    def receive_weights(self, plan: list[list[TensorMeta]], version: int, refs: list | None = None) -> int:
        """Load new weights (streamed by the learner) and take their version."""
        self.llm.collective_rpc("rlhf_receive_weights", args=(plan, refs))
        self.llm.reset_prefix_cache()
        self.version = version
        return self.version
