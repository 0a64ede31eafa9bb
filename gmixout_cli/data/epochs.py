"""Resumable training batches: order and augmentation depend only on (seed, epoch, position).

Each sample carries its own augmentation seed, so the same image gets the same crop and flip
whichever worker loads it, and a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gmixout_cli.data.dataset import ImageListDataset, Loader, init_worker
from gmixout_cli.data.folders import Item


class SeededSamples(Dataset):
    """`dataset[(index, seed)]`: the base sample with torch's RNG seeded for its augmentation."""

    def __init__(self, base: ImageListDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG (dropout, ...) untouched
            torch.manual_seed(seed)
            return self.base[index]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (index, augmentation seed) for one epoch, from batch `start` on; with `shard`, this rank's
    slice of each global batch (the same samples and seeds as one process, split over the ranks)."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool,
                 shard: Callable[[int], slice] | None = None) -> None:
        self.n, self.batch_size, self.seed, self.drop_last, self.shard = n, batch_size, seed, drop_last, shard
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch and the first batch to yield (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=gen).tolist()
        for b in range(self.start, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.shard:
                batch = batch[self.shard(len(batch))]
            yield [(i, seeds[i]) for i in batch]


def make_train_loader(items: list[Item], transform: Callable, batch_size: int, num_workers: int, seed: int,
                      drop_last: bool, shard: Callable[[int], slice] | None = None) -> tuple[DataLoader, EpochBatches]:
    """The training loader and its batch sampler (call `sampler.set_epoch` before each epoch)."""
    sampler = EpochBatches(len(items), batch_size, seed, drop_last, shard)
    # persistent workers: started once per run, not once per epoch (no restart cost, one start-up window)
    loader = Loader(SeededSamples(ImageListDataset(items, transform)), batch_sampler=sampler,
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=init_worker if num_workers else None, persistent_workers=num_workers > 0)
    return loader, sampler
