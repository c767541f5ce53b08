"""Callbacks: overlay images to the run folder and the logger."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CometLogger

from octlightning.visualize import save_png


class LogOverlays(L.Callback):
    """Every ``every_n_epochs`` validation epochs, render the first validation batch as overlays.

    The task renders (``overlay_images(batch, outputs)``); this callback decides when, writes PNGs to
    ``<run>/overlays/epoch_NNN/`` and sends them to a Comet logger when one is attached.
    """

    def __init__(self, every_n_epochs: int = 5, max_images: int = 4) -> None:
        self.every_n_epochs = every_n_epochs
        self.max_images = max_images

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or not outputs or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self.every_n_epochs <= 0 or trainer.current_epoch % self.every_n_epochs:
            return
        if not hasattr(pl_module, "overlay_images"):
            return
        images = pl_module.overlay_images(batch, outputs)[: self.max_images]
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "overlays" / f"epoch_{trainer.current_epoch:03d}"
        for name, image in images:
            save_png(image, folder / f"{name}.png")
            for logger in trainer.loggers:
                if isinstance(logger, CometLogger):
                    logger.experiment.log_image(image, name=f"val/{name}", step=trainer.global_step)
