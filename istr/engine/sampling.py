"""Deterministic, resumable, sharded data order.

The sample at position ``j`` of the global batch of iteration ``i`` is a pure function of
``(seed, i, j)``: which image (a seeded permutation per epoch over the dataset) and the seed of its
augmentation randomness. A resumed run therefore sees exactly the batches an uninterrupted one would,
and ``W`` ranks each taking a contiguous ``B / W`` slice of the global batch see together exactly what
one process with batch ``B`` sees.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset


def sample_seed(seed: int, iteration: int, position: int) -> int:
    """Seed of the augmentation randomness of one sample (a 32-bit int)."""
    return int(np.random.SeedSequence([seed, iteration, position]).generate_state(1)[0])


class IterationBatchSampler:
    """Infinite batch sampler: yields, from ``start_iter`` on, this rank's ``[(index, sample_seed), ...]``.

    Use as ``DataLoader(SeededDataset(ds), batch_sampler=...)``.
    """

    def __init__(self, dataset_size: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0):
        if dataset_size < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        if global_batch % world_size:
            raise ValueError(f"solver.batch_size ({global_batch}) must be divisible by the number of processes ({world_size})")
        self.size, self.batch, self.seed = dataset_size, global_batch, seed
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        return self._perm

    def batch_for(self, iteration: int) -> list[tuple[int, int]]:
        per_rank = self.batch // self.world_size
        out = []
        for position in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            epoch, offset = divmod(iteration * self.batch + position, self.size)
            index = int(self._permutation(epoch)[offset])
            out.append((index, sample_seed(self.seed, iteration, position)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            yield self.batch_for(iteration)
            iteration += 1


class SeededDataset(Dataset):
    """Wraps a map-style dataset: item ``(index, seed)`` loads ``dataset[index]`` with every global RNG
    (python, numpy, torch) seeded by ``seed``, restoring the caller's RNG states afterwards."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
