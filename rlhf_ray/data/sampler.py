"""Prompt sampling with a resumable position: a seeded shuffle per epoch, consumed in order."""

from __future__ import annotations

import random


class PromptSampler:
    def __init__(self, n_prompts: int, batch_size: int, seed: int):
        if n_prompts < 1:
            raise ValueError("the prompt dataset is empty")
        self.n, self.batch_size, self.seed = n_prompts, batch_size, seed
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        """Indices of the next ``batch_size`` prompts (wrapping into a new epoch as needed)."""
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
            order = self._order(self.epoch)
            take = min(self.batch_size - len(out), self.n - self.position)
            out += order[self.position : self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
