"""Callbacks that write what a run produces: validation overlays, predicted volumes (MetaImage) and
MIRAGE-format prediction PNGs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CometLogger

from octlightning.data.formats.metaimage import Geometry, write_metaimage
from octlightning.data.formats.mirage import SemSegInfo, read_info
from octlightning.visualize import save_png


def run_folder(trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
    """The run folder to write into: the task's ``run_dir``, else the trainer's root (the CLI makes it the
    run folder). Never ``trainer.log_dir``: it broadcasts from rank 0, so a writer that runs on rank 0
    only would wait for the other ranks forever under DDP."""
    return Path(getattr(pl_module, "run_dir", None) or trainer.default_root_dir)


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
        folder = run_folder(trainer, pl_module) / "overlays" / f"epoch_{trainer.current_epoch:03d}"
        for name, image in images:
            save_png(image, folder / f"{name}.png")
            for logger in trainer.loggers:
                if isinstance(logger, CometLogger):
                    logger.experiment.log_image(image, name=f"val/{name}", step=trainer.global_step)


class WriteVolumes(L.Callback):
    """Assemble predicted B-scans into label volumes: ``<run>/predictions/<volume>/prediction.mhd``.

    Works with any task whose ``predict_step`` returns ``{"labels": (B, H, W)}`` (SegmentationTask does)
    on batches that carry ``volume`` (name), ``slice`` (index in the volume), ``num_slices``, ``spacing``
    (x, y, z in mm, MetaImage order) and ``size`` (unpadded height, width), and optionally ``origin``
    (x, y, z in mm) and ``direction`` (9 cosines), as the RETOUCH DataModule provides. A volume is
    written (uint8 MetaImage with the input's spacing, origin and direction, so it overlays the scan in
    3D Slicer or ITK-SNAP; see :func:`octlightning.data.formats.metaimage.write_metaimage`) as soon as all
    its slices are in, which keeps memory bounded; under DDP, slices spread over ranks are gathered on
    rank 0 at the end. Batches without those keys are ignored.

    Args:
        folder: sub-folder of the run folder.
        filename: file name inside ``<folder>/<volume>/``.
        compress: write a zlib-compressed ``.zraw`` instead of the challenge's plain ``.raw``.
    """

    def __init__(self, folder: str = "predictions", filename: str = "prediction.mhd", compress: bool = False) -> None:
        self.folder = folder
        self.filename = filename
        self.compress = compress
        self._slices: dict[str, dict[int, object]] = {}
        self._info: dict[str, tuple[int, Geometry]] = {}
        self.written: list[Path] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._slices, self._info, self.written = {}, {}, []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "labels" not in outputs:
            return
        if not all(k in batch for k in ("volume", "slice", "num_slices", "spacing")):
            return
        labels = outputs["labels"]
        for i, volume in enumerate(batch["volume"]):
            h, w = (int(v) for v in batch["size"][i]) if "size" in batch else labels.shape[-2:]
            self._slices.setdefault(volume, {})[int(batch["slice"][i])] = (
                labels[i, :h, :w].to(torch.uint8).cpu().numpy()
            )
            geometry = Geometry(
                **{k: tuple(float(v) for v in batch[k][i]) for k in ("spacing", "origin", "direction") if k in batch}
            )
            self._info[volume] = (int(batch["num_slices"][i]), geometry)
            if len(self._slices[volume]) == self._info[volume][0]:
                self._write(trainer, pl_module, volume)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import warnings

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self._slices, self._info))
            self._slices, self._info = {}, {}
            if not trainer.is_global_zero:
                return
            for slices, info in gathered:
                for volume, parts in slices.items():
                    self._slices.setdefault(volume, {}).update(parts)
                    self._info[volume] = info[volume]
            for volume in sorted(self._slices):
                if len(self._slices[volume]) == self._info[volume][0]:
                    self._write(trainer, pl_module, volume)
        for volume, parts in sorted(self._slices.items()):
            warnings.warn(
                f"WriteVolumes: volume {volume} got {len(parts)} of {self._info[volume][0]} B-scans "
                f"(predict batches limited?); {self.filename} not written for it",
                stacklevel=2,
            )
        self._slices, self._info = {}, {}

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, volume: str) -> None:
        import numpy as np

        parts = self._slices.pop(volume)
        _, geometry = self._info.pop(volume)
        array = np.stack([parts[z] for z in sorted(parts)])
        path = run_folder(trainer, pl_module) / self.folder / volume / self.filename
        self.written.append(write_metaimage(array, path, geometry, compress=self.compress))


class WriteMiragePredictions(L.Callback):
    """Write predictions in MIRAGE's evaluation format: ``<run>/<folder>/<stem>_pred.png``, INFO.json values.

    MIRAGE's scoring script (``run_seg_eval.py``) reads ``<model>/preds/<name>_pred.png`` holding, per
    pixel, the INFO.json ``value`` of the predicted class, at the reference's size; this callback writes
    exactly that from the label maps a task's ``predict_step`` returns (``{"labels": (B, H, W)}``, as
    :class:`~octlightning.tasks.segmentation.SegmentationTask` does), cropped to each sample's ``size``,
    so that MIRAGE's own script, or ``octlightning evaluate --protocol mirage``, scores them.

    Args:
        folder: sub-folder of the run folder (MIRAGE's script expects ``preds``).
        info: the dataset's ``INFO.json``; default the DataModule's ``info``
            (:class:`~octlightning.data.oct_semseg.OCTSemSegDataModule` reads it from the dataset).
    """

    def __init__(self, folder: str = "preds", info: str | None = None) -> None:
        self.folder = folder
        self.info_path = info
        self._info: SemSegInfo | None = None
        self.written: list[Path] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = []
        if self.info_path is not None:
            self._info = read_info(self.info_path)
        else:
            info = getattr(trainer.datamodule, "info", None)
            if not isinstance(info, SemSegInfo):
                raise ValueError(
                    "WriteMiragePredictions: the DataModule has no INFO.json classes (info); "
                    "set init_args.info to the dataset's INFO.json"
                )
            self._info = info

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        from PIL import Image

        if not isinstance(outputs, dict) or "labels" not in outputs or self._info is None:
            return
        labels = outputs["labels"]
        run_dir = run_folder(trainer, pl_module)
        for i, sample_id in enumerate(batch["id"]):
            h, w = (int(v) for v in batch["size"][i]) if "size" in batch else labels.shape[-2:]
            name = str(batch["stem"][i]) if "stem" in batch else str(sample_id)
            values = self._info.to_values(labels[i, :h, :w].cpu().numpy())
            path = run_dir / self.folder / f"{name}_pred.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(values).save(path)
            self.written.append(path)
