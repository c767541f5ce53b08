"""Test-only callbacks for DDP runs: make one rank fail; count collective calls inside training steps."""

from pathlib import Path

import lightning as L
import torch


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
