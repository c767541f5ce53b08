"""The resumable ``last.ckpt``: written between epochs when worth its cost, at the end, and on SIGTERM."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from octlightning.callbacks.sigterm import ended_by_sigterm, stop_raising_loader_worker_deaths


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``, the checkpoint a run resumes from, saved when it is worth its cost.

    A full checkpoint (network, optimiser state) of a 31M-parameter U-Net is ~370 MB and takes about
    a second to write; an epoch of the 20-image DRIVE set takes less than that on one GPU, so saving
    after every epoch would more than double the training time. ``last.ckpt`` is therefore written:

    - between two training epochs once ``every_s`` seconds have passed since the previous save
      (``0``: after every epoch) -- a hard kill (SIGKILL, out-of-memory, power) loses at most that much;
    - when training ends (max_epochs, max_steps, early stopping), so a finished run is complete;
    - when the run is stopped by SIGTERM (SLURM pre-emption, ``kill``, a sweep's Ctrl-C): Lightning
      stops cleanly after the current batch but would save nothing.

    Logs agree with the checkpoint: every logger is flushed (``metrics.csv`` written, Comet's queue
    drained) *before* the file is written, so whatever ``last.ckpt`` records as done is on disk in the
    logs. That is also why the epoch save happens at the start of the next epoch rather than in
    ``on_train_epoch_end``: Lightning logs an epoch's training means (``train/loss_epoch``) after every
    ``on_train_epoch_end`` hook, so a checkpoint written there would call the epoch finished while its
    means are not logged yet, and a kill in between would lose them for good. Saves happen between
    epochs (resuming mid-epoch would replay or skip batches), atomically (Lightning writes a temporary
    file, then renames it, so a kill during a save leaves the previous file).
    """

    def __init__(self, every_s: float = 60.0, dirpath: str | Path | None = None) -> None:
        super().__init__(
            dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, save_top_k=1, save_on_train_epoch_end=True
        )
        self.every_s = every_s
        self._last_save_time = time.monotonic()
        self._due = False  # the epoch that just ended is to be saved when the next one starts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()
        self._due = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = time.monotonic() - self._last_save_time >= self.every_s
        # Every rank must make the same choice: saving is a collective call under DDP.
        self._due = bool(trainer.strategy.broadcast(due, src=0))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Checkpoint callbacks run after all others, so this epoch's learning rate is logged too.
        if self._due:
            # The epoch loop clears its batch counters only after this hook; saved as they are, they
            # would tell a resumed run that this epoch's batches were done (it would skip the epoch).
            # Clearing them now is what the loop does next anyway (its reset for a new, not resumed, run).
            trainer.fit_loop.epoch_loop.reset()
            self._save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:  # not already saved at this step
            self._save_now(trainer)

    #: Set when a fit in this process was stopped by SIGTERM (``octlightning`` then exits with one line).
    stopped_by_sigterm = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn != TrainerFn.FITTING or not ended_by_sigterm(trainer, exception):
            return
        LastCheckpoint.stopped_by_sigterm = True  # on the class main() reads, also from a subclass
        stop_raising_loader_worker_deaths()  # before the save: see there
        if self.dirpath is None:
            return
        path = self._save_now(trainer)
        if trainer.is_global_zero:
            print(f"octlightning: SIGTERM received, saved {path}", flush=True)

    def _save_now(self, trainer: L.Trainer) -> Path:
        """Flush every logger, then write ``last.ckpt`` (and tell the loggers, as ModelCheckpoint does)."""
        for logger in trainer.loggers:
            logger.save()
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        self._save_checkpoint(trainer, str(path))
        self.last_model_path = str(path)
        self._last_save_time = time.monotonic()
        self._due = False
        return path
