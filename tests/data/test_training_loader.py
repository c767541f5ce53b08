"""The training loader serves seeded epochs from one iterator, so its workers run across epoch ends."""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import Dataset

from octlightning.cli import OctLightningCLI
from octlightning.data import training_loader
from octlightning.data.training_loader import ContinuousTrainLoader, EpochBatchSampler
from tests.conftest import REPO, TINY_VESSEL


class _Indices(Dataset):
    """Sample i is (i, pid of the process that loaded it)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, os.getpid()])


def test_every_epoch_is_a_seeded_permutation_in_full_batches():
    sampler = EpochBatchSampler(10, batch_size=3, drop_last=True, seed=7)
    epochs = [sampler.epoch_batches(e) for e in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [3, 3, 3]
        assert len({i for b in batches for i in b}) == 9
    assert epochs[0] != epochs[1], "a new order every epoch"
    resumed = EpochBatchSampler(10, batch_size=3, drop_last=True, seed=7, start_epoch=1)
    stream = iter(resumed)
    assert [next(stream) for _ in range(6)] == epochs[1] + epochs[2], "a run resumed at epoch 1 draws the same"


def test_ranks_share_each_epoch_without_overlap(monkeypatch):
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(training_loader, "_rank_and_world", lambda rank=rank: (rank, 2))
        parts.append([i for b in EpochBatchSampler(9, 2, drop_last=False, seed=0).epoch_batches(4) for i in b])
    assert len(parts[0]) == len(parts[1]) == 5  # 9 samples padded to 10, 5 per rank
    assert set(parts[0]) | set(parts[1]) == set(range(9))
    assert len(set(parts[0]) & set(parts[1])) == 1  # only the padding repeats a sample
    # 5 samples per rank and batches of 8: one short batch, not an empty epoch
    assert EpochBatchSampler(9, 8, drop_last=True, seed=0).batches_per_epoch() == 1


def test_workers_carry_on_across_epochs_and_a_cut_epoch_restarts_cleanly():
    loader = ContinuousTrainLoader(_Indices(), batch_size=4, drop_last=True, seed=3, num_workers=1)
    pids, served = set(), []
    for _ in range(3):
        batches = list(loader)
        pids |= {int(p) for b in batches for p in b[:, 1]}
        served.append([b[:, 0].tolist() for b in batches])
    assert served == [loader.batch_sampler.epoch_batches(e) for e in range(3)]
    assert len(pids) == 1 and os.getpid() not in pids, "one worker process served every epoch"

    next(iter(loader))  # epoch 3 stopped after one batch (max_steps, limit_train_batches)
    after = [b[:, 0].tolist() for b in loader]
    assert after == loader.batch_sampler.epoch_batches(4), "the next epoch starts at its own first batch"
    loader.close()


class _IteratorIds(L.Callback):
    def __init__(self) -> None:
        self.ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.ids.append(id(trainer.datamodule._train_loader._iterator))


def test_a_fit_keeps_one_loader_iterator_for_all_its_epochs(drive_root, tmp_path):
    args = [
        "--config", str(REPO / "hparams" / "vessel_unet.json"), "--data.init_args.root", str(drive_root),
        *TINY_VESSEL, "--data.init_args.num_workers", "1", "--data.init_args.patch_size", "32",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "3", "--comet", "false",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
    ]  # fmt: skip
    cli = OctLightningCLI(args=args, run=False)
    ids = _IteratorIds()
    cli.trainer.callbacks.append(ids)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(ids.ids) == 3 and len(set(ids.ids)) == 1
    assert cli.datamodule._train_loader is None, "fit's teardown stopped the workers"
