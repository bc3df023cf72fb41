"""A seeded, distributed-aware sampler whose position can be saved and restored mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Each epoch a seeded permutation, padded to a multiple of the world size and dealt out by rank.

    Every rank computes the same permutation from (seed, epoch) alone, so no communication is needed and a
    restored (epoch, position) reproduces the exact remaining order. `position` counts indices this rank
    has handed out in the current epoch; `load_state_dict` makes the next iteration start there.
    """

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._resume_from = 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_from = 0

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the current epoch, from the start."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = len(self) * self.num_replicas
        # repeat from the start so every rank gets the same count (DDP ranks must take the same steps)
        order = (order * math.ceil(total / max(1, len(order))))[:total]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._resume_from = self._resume_from, 0
        self.position = start
        for index in self.epoch_indices()[start:]:
            self.position += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch = state["epoch"]
        self.position = self._resume_from = state["position"]
