"""Batches from the image cache: a deterministic, resumable order, a prefetching loader, and the move to the device.

Flip and scaling to [-1, 1] happen per batch on the training device (`to_model_input`), not per image on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from ddpm.errors import UserError

if TYPE_CHECKING:
    from ddpm.data.cache import ImageCache


class BatchOrder:
    """Deterministic, resumable batch order: epoch e is a permutation drawn from (seed, e);
    rank r of w takes batch slots r, r + w, ... so ranks read disjoint rows. The position
    (epoch, batch) is all that resuming needs: nothing before it is read again."""

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_images // (batch_size * world_size)  # drop_last, on every rank alike
        if self.batches_per_epoch == 0:
            raise UserError(
                f"dataset has {num_images} images, fewer than one batch of "
                f"train.batch_size={batch_size} x {world_size} processes"
            )
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
            self._epoch = epoch
        start = (batch * self.world_size + self.rank) * self.batch_size
        return self._perm[start : start + self.batch_size]

    def positions(self, epoch: int, batch: int) -> Iterator[tuple[int, int]]:
        """(epoch, batch) from the given position onwards, forever."""
        while True:
            for b in range(batch, self.batches_per_epoch):
                yield epoch, b
            epoch, batch = epoch + 1, 0


class BatchLoader:
    """Yields (position, uint8 host batch, int64 labels or None) from the cache, reading the next one in a
    background thread; the labels are the same rows' classes (data.labels)."""

    def __init__(self, cache: ImageCache, order: BatchOrder, epoch: int, batch: int, pin_memory: bool):
        self.cache, self.order, self.pin_memory = cache, order, pin_memory
        self._positions = order.positions(epoch, batch)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._next = self._pool.submit(self._read, next(self._positions))

    def _read(self, position: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]:
        indices = self.order.indices(*position)
        batch = torch.from_numpy(self.cache.take(indices))
        labels = None if self.cache.labels is None else torch.from_numpy(self.cache.labels[indices].astype(np.int64))
        return position, (batch.pin_memory() if self.pin_memory else batch), labels

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]:
        result = self._next.result()
        self._next = self._pool.submit(self._read, next(self._positions))
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def to_model_input(
    batch: torch.Tensor, device: torch.device, random_flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """uint8 (B, H, W, C) on the host -> float (B, C, H, W) in [-1, 1] on the device, flipped at random."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if random_flip:
        flip = torch.rand(x.shape[0], 1, 1, 1, device=device, generator=generator) < 0.5
        x = torch.where(flip, x.flip(3), x)
    # channels_last feeds cuDNN's fastest convolutions; on CPUs it measured slower (docs/benchmarks.md)
    return x.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
