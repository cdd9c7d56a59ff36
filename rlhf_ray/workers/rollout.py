"""Rollout worker: one vLLM engine that generates completions with their logprobs.

The engine runs in this worker's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` on CPU, set by
the group) so weights can be loaded into it directly; with tensor parallelism vLLM starts its
own workers and the weight-sync extension runs in each of them. Every sample carries the
``weight_version`` of the engine that made it, and an engine refuses to generate from weights
older than the trainer asks for.

In-flight weight updates (``trainer.max_staleness > 0``): the worker is a threaded Ray actor
(``max_concurrency > 1``, set by the group) so ``receive_weights`` is accepted while a
``generate`` call runs. vLLM's offline ``LLM.generate`` blocks until every request finishes, so
an asynchronous generate runs in chunks of ``chunk_tokens``: between chunks the unfinished
completions are resubmitted with their generated prefix as the prompt (abort + resubmit of the
unfinished prefix), and a pending weight load runs there, whole, under the engine lock, so no
chunk ever sees a partly loaded set of buckets. Each token records the weight version of the
chunk that produced it. ``chunk_tokens = 0`` (the synchronous step) is one plain call.

LoRA adapters (``model.lora.sync=adapter``, the worker's ``lora``): the engine keeps the base
weights it started with and serves the policy as a vLLM LoRA adapter. Each sync streams only
the adapter tensors; the receiver writes them as a PEFT directory on this node's disk (vLLM
loads adapters from a directory; nothing is shared across nodes) and the engine loads it under
a new LoRA id (vLLM caches adapters by id), so every generate and score call after it, chunks
included, runs with that version's ``LoRARequest``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time

from rlhf_ray.batch import RolloutSample
from rlhf_ray.config import LoRAConfig, RolloutConfig
from rlhf_ray.faults import maybe_fail
from rlhf_ray.sampling import sampling_params
from rlhf_ray.sync.buckets import TensorMeta
from rlhf_ray.workers.common import started_up

RECEIVER = "rlhf_ray.sync.receiver.WeightReceiver"


class StaleWeightsError(RuntimeError):
    """An engine was asked to generate with weights older than the trainer's."""


class RolloutWorker:
    lora_request = None  # the adapter every request runs with (None: the loaded weights alone)

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
        lora: LoRAConfig | None = None,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
        if cfg.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        started_up()
        self.name, self.cfg, self.model_path = name, cfg, model_path
        extra = {"gpu_memory_utilization": cfg.gpu_memory_utilization} if device == "cuda" else {}
        if lora is not None:  # one adapter at a time (the current policy version), on its modules only
            from rlhf_ray.models.lora import lora_module_suffixes, vllm_max_lora_rank

            extra.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora.rank), max_loras=1,
                         lora_target_modules=lora_module_suffixes(model_path, lora, trust_remote_code))
            self._lora_dir, self._lora_ids = tempfile.mkdtemp(prefix="rlhf_ray_lora_"), itertools.count(1)
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
        # One lock around every use of the engine; ``_loads_waiting`` makes chunks yield to a
        # pending weight load, ``_versions`` wakes generate calls that wait for new weights.
        self._engine_lock = threading.Lock()
        self._generate_lock = threading.Lock()  # one generate call at a time, in arrival order
        self._versions = threading.Condition()
        self._loads_waiting = 0
        self.busy_s = 0.0

    def __repr__(self) -> str:
        return f"RolloutWorker({self.name})"

    def weight_version(self) -> int:
        return self.version

    def busy_seconds(self) -> float:
        """Seconds spent generating since the worker started (the dashboard's busy fraction)."""
        return self.busy_s

    def _wait_for_version(self, min_version: int, wait_s: float) -> None:
        """Throttle: block until weights ``>= min_version`` are loaded (``wait_s = 0``: fail at once)."""
        with self._versions:
            if not self._versions.wait_for(lambda: self.version >= min_version, timeout=wait_s):
                raise StaleWeightsError(f"{self.name} holds weights v{self.version}, trainer is at v{min_version}")

    def _params(self, n: int, seed: int, max_tokens: int):
        return sampling_params(self.cfg, self.model_path, seed=seed, n=n, max_tokens=max_tokens)

    def _run(self, requests: list[dict], params: list) -> tuple[list, int]:
        """One ``LLM.generate`` under the engine lock, after any pending weight load; returns
        the outputs and the version of the weights that produced them."""
        while self._loads_waiting:
            time.sleep(0.001)
        with self._engine_lock:
            start = time.perf_counter()
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
            self.busy_s += time.perf_counter() - start
            return outputs, self.version

    def generate(
        self, prompt_ids: list[list[int]], prompt_indices: list[int], *, seed: int, min_version: int,
        n: int | None = None, chunk_tokens: int = 0, wait_s: float = 0.0,
    ) -> list[RolloutSample]:
        """``n`` (default ``n_samples_per_prompt``) completions of each prompt, contiguous, from
        weights ``>= min_version`` (waiting up to ``wait_s`` for them); ``chunk_tokens > 0``
        lets new weights load between chunks of that many tokens."""
        n = n or self.cfg.n_samples_per_prompt
        # wait for the weights outside the generate lock: an earlier batch (which asks for older
        # weights) must be able to run meanwhile, or the learner would never produce them
        self._wait_for_version(min_version, wait_s)
        with self._generate_lock:
            started = time.time()
            if chunk_tokens <= 0 or chunk_tokens >= self.cfg.max_new_tokens:
                samples = self._generate_whole(prompt_ids, prompt_indices, seed, n)
            else:
                samples = self._generate_chunked(prompt_ids, prompt_indices, seed, n, chunk_tokens)
        maybe_fail(self.name, "generate")
        for s in samples:
            s.started, s.finished = started, time.time()
        return samples

    def _generate_whole(self, prompt_ids, prompt_indices, seed: int, n: int) -> list[RolloutSample]:
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        params = [self._params(n, seed + i, self.cfg.max_new_tokens) for i in prompt_indices]
        outputs, version = self._run(requests, params)
        samples = []
        for out, index, ids in zip(outputs, prompt_indices, prompt_ids, strict=True):
            for c in out.outputs:
                token_ids = list(c.token_ids)
                logprobs = [lp[t].logprob for lp, t in zip(c.logprobs, token_ids, strict=True)]
                samples.append(RolloutSample(index, list(ids), token_ids, logprobs, version, self.name,
                                             str(c.finish_reason), [version] * len(token_ids)))
        return samples

    def _generate_chunked(self, prompt_ids, prompt_indices, seed: int, n: int, chunk: int) -> list[RolloutSample]:
        """Every completion is its own request; unfinished ones are resubmitted with their
        prefix after each chunk, so a weight load between chunks reaches them mid-sequence."""
        samples = [RolloutSample(index, list(ids), [], [], -1, self.name, "", [])
                   for index, ids in zip(prompt_indices, prompt_ids, strict=True) for _ in range(n)]
        seeds = [seed + index * 1_000 + j for index in prompt_indices for j in range(n)]
        for round_ in range(0, self.cfg.max_new_tokens, chunk):
            todo = [i for i, s in enumerate(samples) if not s.finish_reason]
            if not todo:
                break
            left = self.cfg.max_new_tokens - round_
            requests = [{"prompt_token_ids": samples[i].prompt_ids + samples[i].response_ids} for i in todo]
            outputs, version = self._run(requests, [self._params(1, seeds[i] + round_, min(chunk, left)) for i in todo])
            for i, out in zip(todo, outputs, strict=True):
                c, s = out.outputs[0], samples[i]
                token_ids = list(c.token_ids)
                s.response_ids += token_ids
                s.logprobs += [lp[t].logprob for lp, t in zip(c.logprobs, token_ids, strict=True)]
                s.token_versions += [version] * len(token_ids)
                if s.weight_version < 0:
                    s.weight_version = version
                if str(c.finish_reason) != "length" or len(s.response_ids) >= self.cfg.max_new_tokens:
                    s.finish_reason = str(c.finish_reason)
        return samples

    def score_tokens(self, sequences: list[list[int]]) -> list[list[float]]:
        """vLLM's logprob of every token after the first of each sequence (the spot check)."""
        with self._engine_lock:
            return self._score_tokens(sequences)

    def _score_tokens(self, sequences: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=self.cfg.temperature, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        return [
            [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], seq[1:], strict=True)]
            for out, seq in zip(outputs, sequences, strict=True)
        ]

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                          timeout_s: float = 300.0) -> None:
        with self._engine_lock:
            self.llm.collective_rpc("rlhf_init_weight_group", args=(host, port, rank_offset, world_size, timeout_s))

    def receive_weights(self, plan: list[list[TensorMeta]], version: int, refs: list | None = None,
                        check: list[list[int]] | None = None,
                        adapter: dict | None = None) -> tuple[int, list[list[float]]]:
        """Load new weights (streamed by the learner) and take their version: all buckets
        under the engine lock, between two chunks of any running generate call. ``adapter``
        (a PEFT adapter config) means the stream is that LoRA adapter's tensors. Returns the
        version and, for the spot check, the new weights' logprobs of the ``check`` sequences."""
        with self._versions:
            self._loads_waiting += 1  # the next chunk waits for this load
        try:
            with self._engine_lock:
                if adapter is None:
                    self.llm.collective_rpc("rlhf_receive_weights", args=(plan, refs))
                else:
                    self._load_adapter(plan, refs, version, adapter)
                self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
                scored = self._score_tokens(check) if check else []
                with self._versions:
                    self.version = version
                    self._versions.notify_all()
        finally:
            with self._versions:
                self._loads_waiting -= 1
        return self.version, scored

    def _load_adapter(self, plan: list[list[TensorMeta]], refs: list | None, version: int, config: dict) -> None:
        """The adapter streamed by the learner, as this engine's new LoRA adapter (engine lock held)."""
        from vllm.lora.request import LoRARequest

        if not hasattr(self, "_lora_dir"):
            raise RuntimeError(f"{self.name} got a LoRA adapter but was started without LoRA (lora=None)")
        lora_id = next(self._lora_ids)  # a fresh id: vLLM would serve a cached adapter under a known one
        path = os.path.join(self._lora_dir, str(lora_id))
        self.llm.collective_rpc("rlhf_receive_adapter", args=(plan, refs, path, config))
        request = LoRARequest(f"policy-v{version}-{lora_id}", lora_id, path)
        self.llm.llm_engine.add_lora(request)  # load now: a bad adapter fails the sync, not a rollout
        old, self.lora_request = self.lora_request, request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
