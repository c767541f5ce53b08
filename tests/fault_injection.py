"""Test-only callback that makes one DDP rank fail, to check that the others do not hang."""

import lightning as L


class RaiseOnRank(L.Callback):
    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank}")
