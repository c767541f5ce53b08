"""A training loader whose workers run on across epoch boundaries.

A ``DataLoader`` starts each epoch with a new iterator: even with persistent workers, the first batch
of every epoch is prepared only after the previous epoch has ended, and the GPU waits for it. With
the 16 training images of DRIVE (4 batches per epoch, ~100 ms to augment a batch of whole images on
one core) that wait is a large share of every epoch. :class:`ContinuousTrainLoader` keeps one
iterator over an endless sequence of epochs, so the workers prepare the next epoch's first batches
while the current epoch's last steps run; Lightning still sees epochs of ``len(loader)`` batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, Sampler


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of sample indices for epoch ``start_epoch``, then the next, without end.

    Each epoch is a permutation seeded by ``seed + epoch`` (the same on every rank, so a resumed run
    draws the same epochs as an uninterrupted one), split across DDP ranks as ``DistributedSampler``
    does: padded with its first indices to a multiple of the world size, rank ``r`` taking every
    ``world``-th index from ``r``. Batches never straddle two epochs.
    """

    def __init__(self, num_samples: int, batch_size: int, drop_last: bool, seed: int, start_epoch: int = 0) -> None:
        if num_samples < 1:
            raise ValueError("the training set is empty")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.start_epoch = start_epoch

    def batches_per_epoch(self) -> int:
        per_rank = math.ceil(self.num_samples / _rank_and_world()[1])
        full = per_rank // self.batch_size
        # drop_last drops an incomplete last batch, never a rank's only one
        return full if self.drop_last and full > 0 else math.ceil(per_rank / self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rank, world = _rank_and_world()
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        padded = order + order[: math.ceil(len(order) / world) * world - len(order)]
        mine = padded[rank::world]
        size = self.batch_size
        return [mine[i * size : (i + 1) * size] for i in range(self.batches_per_epoch())]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.start_epoch
        while True:
            yield from self.epoch_batches(epoch)
            epoch += 1


class ContinuousTrainLoader:
    """Epochs of ``len(self)`` batches drawn from one long-lived ``DataLoader`` iterator.

    Args:
        dataset: the training set.
        batch_size, drop_last, seed: batching and shuffling, see :class:`EpochBatchSampler`.
        current_epoch: returns the epoch that is starting (the trainer's ``current_epoch``); ``None``
            counts the epochs started. A run resumed at epoch ``E`` starts its permutations there.
        rank: the global rank, for Lightning's per-worker seeding (``seed_everything(workers=True)``).
        loader_kwargs: the rest of the ``DataLoader`` settings (workers, pinning, collate_fn, ...).

    An epoch that ends early (``limit_train_batches``, ``max_steps``) leaves the iterator mid-epoch;
    the next epoch then starts a fresh iterator, as a plain ``DataLoader`` would.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        drop_last: bool,
        seed: int,
        current_epoch: Callable[[], int] | None = None,
        rank: int = 0,
        **loader_kwargs: Any,
    ) -> None:
        self.batch_sampler = EpochBatchSampler(len(dataset), batch_size, drop_last, seed)  # type: ignore[arg-type]
        if int(os.environ.get("PL_SEED_WORKERS", 0)) and loader_kwargs.get("num_workers", 0) > 0:
            # Lightning adds this to the DataLoaders it sees; this one it does not see.
            loader_kwargs.setdefault("worker_init_fn", partial(pl_worker_init_function, rank=rank))
        self.loader = DataLoader(dataset, batch_sampler=self.batch_sampler, **loader_kwargs)
        self.current_epoch = current_epoch
        self._iterator: Iterator | None = None
        self._next_epoch: int | None = None  # the epoch the iterator is at the start of
        self._epochs_started = 0

    def __len__(self) -> int:
        return self.batch_sampler.batches_per_epoch()

    def __iter__(self) -> Iterator[Any]:
        epoch = self.current_epoch() if self.current_epoch is not None else self._epochs_started
        self._epochs_started = epoch + 1
        if self._iterator is None or self._next_epoch != epoch:
            self.close()
            self.batch_sampler.start_epoch = epoch
            self._iterator = iter(self.loader)
        self._next_epoch = None  # set again when the epoch's last batch is taken
        n = len(self)
        for i in range(n):
            batch = next(self._iterator)
            if i == n - 1:  # consumers stop after len() batches without asking for more
                self._next_epoch = epoch + 1
            yield batch

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage-collected)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
