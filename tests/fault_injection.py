"""Test-only callbacks: make one DDP rank fail; count collective calls inside training steps; SIGKILL a
run at a known point."""

import os
import signal
from pathlib import Path

import lightning as L
import torch

from octlightning.callbacks import LastCheckpoint


class RaiseOnRank(L.Callback):
    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank}")


class CountStepCollectives(L.Callback):
    """Counts ``torch.distributed.all_reduce`` calls made from Python during training steps (DDP's own
    gradient reduction runs in C++ and is not counted) and writes ``step_all_reduce_rank<N>.txt``."""

    def __init__(self) -> None:
        self.count = 0
        self.in_step = False
        self._original = None

    def on_train_start(self, trainer, pl_module):
        self._original = original = torch.distributed.all_reduce

        def counting(*args, **kwargs):
            self.count += self.in_step
            return original(*args, **kwargs)

        torch.distributed.all_reduce = counting

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.in_step = False

    def on_train_end(self, trainer, pl_module):
        torch.distributed.all_reduce = self._original
        path = Path(trainer.default_root_dir) / f"step_all_reduce_rank{trainer.global_rank}.txt"
        path.write_text(str(self.count))


class KillAfterLastCheckpoint(LastCheckpoint):
    """The run's ``last.ckpt`` callback, which SIGKILLs its own process right after the save that records
    ``epochs`` finished epochs: the worst moment for logs to lag behind the checkpoint, reached at the
    same point every time (no timing). A resumed run, whose saves record more epochs, is not killed."""

    def __init__(self, epochs: int = 1, every_s: float = 0.0) -> None:
        super().__init__(every_s=every_s)
        self.epochs = epochs

    def _save_now(self, trainer):
        path = super()._save_now(trainer)
        if trainer.current_epoch == self.epochs:  # the checkpoint records epochs 0 .. epochs - 1
            os.kill(os.getpid(), signal.SIGKILL)
        return path


class SigtermDuringTest(L.Callback):
    """Sends SIGTERM to its own process group after the first test batch, as ``timeout``, ``scancel`` or
    a sweep's Ctrl-C would in the middle of ``octlightning test`` (no timing: always at that batch)."""

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            os.killpg(os.getpgid(0), signal.SIGTERM)
