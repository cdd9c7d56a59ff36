"""Supervised learner ranks of the InstructGPT recipe (Ouyang et al. 2022), on the DeepSpeed
rank shared with the policy and critic:

* ``SFTWorker``: a causal LM trained on demonstrations, loss on the response tokens only;
* ``RewardModelWorker``: a sequence classifier trained on rankings of K completions with the
  all-pairs ranking loss (eq. 1 of the paper).

This module also owns the two batch layouts and the tokenization that builds them. The reward
model sees exactly what ``workers.reward.ModelScorer`` scores during RL: the text
``prompt + completion`` (no EOS), right-padded, scored at its last real token; for chat rows the
prompt text is the chat template's rendering with the generation prompt (what the policy saw).
SFT chat rows are tokenized with :func:`rlhf_ray.data.chat.encode_conversation`: the loss
covers every assistant turn (its end-of-turn token included) and nothing else.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from rlhf_ray.algo import ranking_loss, sft_loss
from rlhf_ray.data.chat import ChatError, Messages, encode_conversation, render_prompt
from rlhf_ray.data.datasets import DataError
from rlhf_ray.faults import maybe_fail
from rlhf_ray.models import load_causal_lm, load_reward_model
from rlhf_ray.workers.deepspeed_rank import DeepSpeedRank
from rlhf_ray.workers.forward import shared_prefix_scores


class _Rows:
    """Row-wise ``select`` / ``split`` / ``to`` over every tensor field (dim 0 = rows)."""

    def __len__(self) -> int:
        return getattr(self, fields(self)[0].name).shape[0]

    def select(self, index: torch.Tensor | slice):
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def split(self, n: int) -> list:
        """``n`` equal contiguous shards (``len(self)`` must divide by ``n``)."""
        if len(self) % n:
            raise ValueError(f"cannot split {len(self)} rows into {n} equal shards")
        size = len(self) // n
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(n)]

    def to(self, device: torch.device | str):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class DemonstrationBatch(_Rows):
    """Demonstrations for SFT, right-padded: ``[prompt | response EOS | pad]``."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long: 1 on real tokens
    loss_mask: torch.Tensor  # (B, T) float: 1 on response tokens (EOS included), the SFT targets


@dataclass
class RankingBatch(_Rows):
    """Comparisons for the reward model: each row's K completions, best -> worst."""

    input_ids: torch.Tensor  # (B, K, T) long: text prompt + completion k, right-padded
    attention_mask: torch.Tensor  # (B, K, T) long: 1 on real tokens


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _check_len(n: int, max_len: int, where: str) -> None:
    if n > max_len:
        raise DataError(f"{where}: {n} tokens, more than max_len={max_len} (raise data.max_len or shorten it)")


def encode_demonstrations(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int,
                          source: str = "demonstrations",
                          messages: Sequence[Messages] | None = None) -> DemonstrationBatch:
    """Raw rows: prompt and response are tokenized separately (as rollout sees them: the engine
    gets the prompt's ids and generates the response's), EOS is appended to the response. Rows
    with a non-empty ``messages[i]`` are chat conversations: loss on the assistant turns only."""
    rows, masks = [], []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if messages is not None and messages[i]:
            try:
                seq, mask = encode_conversation(tokenizer, messages[i])
            except ChatError as e:
                raise DataError(f"{source} row {i}: {e}") from e
        else:
            prompt_ids = list(tokenizer(p)["input_ids"])
            response_ids = list(tokenizer(r, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
            seq, mask = prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)
        _check_len(len(seq), max_len, f"{source} row {i}")
        rows.append(seq)
        masks.append(mask)
    input_ids, attention_mask = _pad(rows, tokenizer.pad_token_id)
    loss_mask = torch.zeros(input_ids.shape, dtype=torch.float32)
    for i, mask in enumerate(masks):
        loss_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.float32)
    return DemonstrationBatch(input_ids, attention_mask, loss_mask)


def encode_rankings(tokenizer, prompts: Sequence[str], rankings: Sequence[Sequence[str]], max_len: int,
                    source: str = "comparisons", messages: Sequence[Messages] | None = None) -> RankingBatch:
    """Every row must rank the same number K of completions (the batch is ``(B, K, T)``). Rows
    with a non-empty ``messages[i]`` use the chat template's rendering of it as the prompt."""
    k = len(rankings[0])
    texts = []
    for i, (prompt, completions) in enumerate(zip(prompts, rankings, strict=True)):
        if len(completions) != k:
            raise DataError(f"{source} row {i}: {len(completions)} completions, but row 0 has {k}; "
                            "every row must rank the same number of completions")
        if messages is not None and messages[i]:
            try:
                prompt = render_prompt(tokenizer, messages[i])
            except ChatError as e:
                raise DataError(f"{source} row {i}: {e}") from e
        texts += [prompt + c for c in completions]
    ids = tokenizer(texts)["input_ids"]
    for j, row in enumerate(ids):
        _check_len(len(row), max_len, f"{source} row {j // k} completion {j % k}")
    input_ids, attention_mask = _pad([list(r) for r in ids], tokenizer.pad_token_id)
    return RankingBatch(input_ids.view(len(prompts), k, -1), attention_mask.view(len(prompts), k, -1))


def train_rows(rank: DeepSpeedRank, batch, loss_fn: Callable, steps: int) -> dict[str, float]:
    """``steps`` optimizer steps of ``micro_batch_size`` shuffled rows each (the supervised
    groups run with gradient_accumulation_steps=1). ``DeepSpeedRank.train_on`` is the RL
    minibatch loop (response masks, loss normaliser) and does not fit these batches."""
    maybe_fail(rank.name, "train")
    rank.engine.train()
    batch = batch.to(rank.device)
    mb = rank.cfg.micro_batch_size
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(rank.seed + rank.engine.global_steps))
    sums: dict[str, float] = defaultdict(float)
    skipped_before = rank.skipped_steps()
    for i in range(steps):
        loss, metrics = loss_fn(batch.select(order[i * mb : (i + 1) * mb].to(rank.device)))
        rank.engine.backward(loss)
        rank.engine.step()
        sums["loss"] += float(loss.detach())
        for k, v in metrics.items():
            sums[k] += float(v)
    out = {f"{rank.role}/{k}": v / max(steps, 1) for k, v in sums.items()}
    out[f"{rank.role}/lr"] = rank.scheduler.get_last_lr()[0]
    out[f"{rank.role}/nonfinite_steps"] = float(rank.skipped_steps() - skipped_before)
    grad_norm = rank.engine.get_global_grad_norm()
    if grad_norm is not None:
        out[f"{rank.role}/grad_norm"] = float(grad_norm)
    return out


class SFTWorker(DeepSpeedRank):
    """One rank of SFT: ``train`` runs optimizer steps, ``evaluate`` returns loss sums."""

    role = "sft"

    def build_model(self) -> torch.nn.Module:
        return load_causal_lm(self.model_path, dtype=self.torch_dtype, trust_remote_code=self.trust_remote_code)

    def _nll(self, batch: DemonstrationBatch) -> torch.Tensor:
        logits = self.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        # position t predicts token t + 1
        return sft_loss(logits[:, :-1].float(), batch.input_ids[:, 1:], batch.loss_mask[:, 1:])

    def train(self, batch: DemonstrationBatch, steps: int) -> dict[str, float]:
        """``steps`` optimizer steps over this rank's shard (``steps`` x micro_batch_size rows)."""
        return train_rows(self, batch, lambda b: (self._nll(b), {}), steps)

    @torch.no_grad()
    def evaluate(self, batch: DemonstrationBatch) -> dict[str, float]:
        """``{"nll_sum", "tokens"}`` over this rank's held-out shard (summed by the driver)."""
        self.engine.eval()
        batch = batch.to(self.device)
        nll_sum, tokens = 0.0, 0.0
        for start in range(0, len(batch), self.cfg.micro_batch_size):
            b = batch.select(slice(start, start + self.cfg.micro_batch_size))
            n = float(b.loss_mask[:, 1:].sum())
            nll_sum += float(self._nll(b)) * n
            tokens += n
        return {"nll_sum": nll_sum, "tokens": tokens}


class RewardModelWorker(DeepSpeedRank):
    """One rank of reward-model training: a scalar-head sequence classifier."""

    role = "reward_model"

    def build_model(self) -> torch.nn.Module:
        model = load_reward_model(self.model_path, dtype=self.torch_dtype, trust_remote_code=self.trust_remote_code)
        model.config.classifier_dropout = 0.0
        return model

    def _rewards(self, batch: RankingBatch) -> torch.Tensor:
        """(B, K) scalar reward of every completion. Under ZeRO 0-2 the K completions of a
        ranking share one pass over their common prefix (the prompt; ``shared_prefix_scores``)."""
        b, k, t = batch.input_ids.shape
        ids, mask = batch.input_ids.reshape(b * k, t), batch.attention_mask.reshape(b * k, t)
        scores = shared_prefix_scores(self.engine.module, ids, mask, k) if self.cfg.zero_stage < 3 else None
        if scores is None:
            scores = self.engine(input_ids=ids, attention_mask=mask).logits[:, 0]
        return scores.float().view(b, k)

    def train(self, batch: RankingBatch, steps: int) -> dict[str, float]:
        """``steps`` optimizer steps; metrics ``reward_model/loss``, ``reward_model/accuracy``."""
        return train_rows(self, batch, lambda b: ranking_loss(self._rewards(b)), steps)

    @torch.no_grad()
    def evaluate(self, batch: RankingBatch) -> dict[str, float]:
        """``{"loss_sum", "correct_pairs", "pairs", "rows"}`` over this rank's held-out shard."""
        self.engine.eval()
        batch = batch.to(self.device)
        k = batch.input_ids.shape[1]
        pairs_per_row = k * (k - 1) / 2
        sums = {"loss_sum": 0.0, "correct_pairs": 0.0, "pairs": 0.0, "rows": float(len(batch))}
        for start in range(0, len(batch), self.cfg.micro_batch_size):
            b = batch.select(slice(start, start + self.cfg.micro_batch_size))
            loss, metrics = ranking_loss(self._rewards(b))
            pairs = len(b) * pairs_per_row
            sums["loss_sum"] += float(loss) * pairs
            sums["correct_pairs"] += float(metrics["accuracy"]) * pairs
            sums["pairs"] += pairs
        return sums
