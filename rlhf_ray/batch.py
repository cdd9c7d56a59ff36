"""The data that flows through one step: what rollout returns and what the learners train on.

Shapes use ``B`` = sequences in the batch (prompts x samples per prompt, grouped so that the
samples of one prompt are contiguous), ``P`` = padded prompt length, ``A`` = padded response
length. Prompts are left-padded and responses right-padded, so every response starts at
column ``P`` of ``sequences`` (the layout of OpenRLHF's ``Experience``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class RolloutSample:
    """One completion as an engine produced it."""

    prompt_index: int  # index of the prompt in the step's prompt list
    prompt_ids: list[int]  # prompt tokens as sent to the engine
    response_ids: list[int]  # generated tokens, EOS included when the engine stopped on it
    logprobs: list[float]  # engine's logprob of each generated token, len == len(response_ids)
    weight_version: int  # policy weight version of the engine that generated it
    engine: str  # name of the engine that generated it
    finish_reason: str = ""  # "stop" | "length" | ...
    token_versions: list[int] | None = None  # weight version of each token (None: all weight_version)
    started: float = 0.0  # wall-clock (time.time) span of the generate call that made it
    finished: float = 0.0


@dataclass
class Experience:
    """A padded batch of experience; every tensor field carries its shape in a comment."""

    # --- model inputs
    sequences: torch.Tensor  # (B, P + A) long: [left-padded prompt | right-padded response]
    attention_mask: torch.Tensor  # (B, P + A) long: 1 on real tokens
    response_mask: torch.Tensor  # (B, A) float: 1 on generated tokens
    # --- from the rollout
    rollout_logprobs: torch.Tensor  # (B, A) float: vLLM's logprobs of the sampled tokens
    weight_versions: torch.Tensor  # (B,) long: policy version that generated each row (its first token)
    token_versions: torch.Tensor | None = None  # (B, A) long: version that generated each token (-1 on padding)
    # --- filled by the experience phase
    scores: torch.Tensor | None = None  # (B,) float: reward per sequence
    old_logprobs: torch.Tensor | None = None  # (B, A) policy logprobs before the update
    ref_logprobs: torch.Tensor | None = None  # (B, A) reference policy logprobs
    values: torch.Tensor | None = None  # (B, A) critic values before each response token
    # --- filled by the advantage phase
    advantages: torch.Tensor | None = None  # (B, A)
    returns: torch.Tensor | None = None  # (B, A) critic targets
    valid: torch.Tensor | None = None  # (B,) float: 0 for rows masked out (e.g. non-finite reward)
    extras: dict = field(default_factory=dict)  # not tensors of the batch: prompts, texts, ...

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def select(self, index: torch.Tensor | slice) -> Experience:
        """Rows ``index`` of every tensor field (extras are dropped)."""
        return replace(self, extras={}, **{k: getattr(self, k)[index] for k in self._tensor_fields()})

    def split(self, n: int) -> list[Experience]:
        """``n`` equal contiguous shards (``len(self)`` must divide by ``n``)."""
        if len(self) % n:
            raise ValueError(f"cannot split {len(self)} rows into {n} equal shards")
        size = len(self) // n
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(n)]

    def to(self, device: torch.device | str) -> Experience:
        return replace(self, **{k: getattr(self, k).to(device) for k in self._tensor_fields()})


def pad_samples(samples: list[RolloutSample], pad_id: int) -> Experience:
    """Pack engine samples into an ``Experience`` (left-pad prompts, right-pad responses)."""
    P = max(len(s.prompt_ids) for s in samples)
    A = max(max(len(s.response_ids) for s in samples), 1)
    B = len(samples)
    sequences = torch.full((B, P + A), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + A), dtype=torch.long)
    response_mask = torch.zeros((B, A), dtype=torch.float32)
    rollout_logprobs = torch.zeros((B, A), dtype=torch.float32)
    token_versions = torch.full((B, A), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        p, a = len(s.prompt_ids), len(s.response_ids)
        sequences[i, P - p : P] = torch.tensor(s.prompt_ids)
        sequences[i, P : P + a] = torch.tensor(s.response_ids, dtype=torch.long)
        attention_mask[i, P - p : P + a] = 1
        response_mask[i, :a] = 1.0
        rollout_logprobs[i, :a] = torch.tensor(s.logprobs, dtype=torch.float32)
        token_versions[i, :a] = torch.tensor(s.token_versions if s.token_versions is not None
                                             else [s.weight_version] * a, dtype=torch.long)
    return Experience(
        sequences=sequences,
        attention_mask=attention_mask,
        response_mask=response_mask,
        rollout_logprobs=rollout_logprobs,
        weight_versions=torch.tensor([s.weight_version for s in samples], dtype=torch.long),
        token_versions=token_versions,
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that start at 0 on the first real token (left padding aware)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
