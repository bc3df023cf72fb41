"""A seeded, distributed-aware sampler whose position can be saved and restored mid-epoch."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)


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

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """The position after `consumed` of this epoch's indices (default: as many as were handed out).

        Pass `consumed` when the consumer reads ahead (Lightning prefetches a batch, DataLoader workers more),
        so that a restored run starts at the first index not yet trained on, not the first not yet fetched.
        """
        position = self.position if consumed is None else min(consumed, len(self))
        return {"epoch": self.epoch, "position": position, "seed": self.seed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        position = state["position"]
        saved_replicas = state.get("num_replicas", self.num_replicas)
        if saved_replicas != self.num_replicas:
            # Another world size deals the permutation out differently: keep the share of the epoch done,
            # which repeats or skips at most a few samples of this epoch.
            position = position * saved_replicas // self.num_replicas
            log.warning(
                "resuming on %d processes from a checkpoint written by %d: the rest of this epoch's data order "
                "is approximate",
                self.num_replicas,
                saved_replicas,
            )
        self.epoch = state["epoch"]
        self.position = self._resume_from = min(position, len(self))


class EvalShard(Dataset):
    """This rank's share of an evaluation set, every rank the same length so that collective forward
    passes (FSDP) stay in step; the rows added to even the shares carry weight 0 and count in no metric."""

    def __init__(self, data, *, num_replicas: int = 1, rank: int = 0):
        self.data = data
        own = list(range(rank, len(data), num_replicas))
        length = math.ceil(len(data) / num_replicas)
        self.items = [(i, 1.0) for i in own] + [(own[0] if own else 0, 0.0)] * (length - len(own))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> dict:
        index, weight = self.items[j]
        return {**self.data[index], "weight": weight}
