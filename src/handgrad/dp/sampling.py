"""Poisson sampling, what DP-SGD's accounting assumes: every batch takes each of the n samples
independently with probability q (``sample_rate``), so batch sizes vary around q·n (and may be 0).

``PoissonSampler`` is a DataLoader batch sampler (yields a list of indices per batch);
``poisson_loader`` builds the DataLoader. Opacus's ``UniformWithReplacementSampler`` draws the
same distribution; this one also reseeds per epoch from ``(seed, epoch)`` (Lightning calls
``set_epoch``), so a resumed run draws the batches an uninterrupted one would.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

__all__ = ["PoissonSampler", "poisson_loader"]


class PoissonSampler(Sampler[list[int]]):
    """``steps`` batches per epoch (default ⌈1/q⌉: one pass in expectation), each
    {i : uᵢ < q}, uᵢ ~ U(0, 1) drawn afresh per batch.

    ``seed``: draws from a generator seeded by (seed, epoch); ``None``: from ``generator``
    (or torch's global RNG when that is None too).
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: Optional[int] = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.sample_rate = num_samples, sample_rate
        self.steps = steps if steps is not None else math.ceil(1.0 / sample_rate)
        self.seed, self.generator, self.epoch = seed, generator, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator
        if self.seed is not None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=g) < self.sample_rate  # (n,) each with probability q
            yield mask.nonzero().flatten().tolist()

    def __len__(self) -> int:
        return self.steps


def poisson_loader(dataset: Dataset, sample_rate: float, steps: Optional[int] = None, seed: Optional[int] = None,
                   generator: Optional[torch.Generator] = None, **loader_kwargs) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches are Poisson samples at rate q (``PoissonSampler``);
    ``loader_kwargs`` go to the DataLoader (``num_workers``, ``collate_fn``, …, not ``batch_size``).
    An empty batch comes out as the collated first sample cut to length 0 (Opacus does the same)."""
    sampler = PoissonSampler(len(dataset), sample_rate, steps, seed, generator)
    collate = loader_kwargs.pop("collate_fn", None) or default_collate

    def collate_or_empty(batch: list):
        return collate(batch) if batch else _cut_to_empty(collate([dataset[0]]))

    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_or_empty, **loader_kwargs)


def _cut_to_empty(batch):
    """Every tensor of a collated batch of one, cut to its first 0 rows."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cut_to_empty(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _cut_to_empty(v) for k, v in batch.items()}
    return batch
