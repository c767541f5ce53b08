"""Callbacks: overlays, the resumable last checkpoint, encoder freezing, early stopping after warm-up, a
check that training beats a constant prediction, ISIC scoring, prediction volumes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CometLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from octlightning.data.formats.metaimage import Geometry, write_metaimage
from octlightning.data.formats.mirage import SemSegInfo, read_info
from octlightning.metrics import ISIC_JACCARD_THRESHOLD, thresholded_jaccard
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

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.trainer.states import TrainerFn
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
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


class FreezeBackbone(BaseFinetuning):
    """Train with the pretrained encoder frozen for the first epochs, then fine-tune it at a lower LR.

    The transfer-learning recipe: the randomly initialised decoder first learns on fixed pretrained
    features, so its large early gradients cannot wreck them; from ``unfreeze_at_epoch`` on the
    encoder trains too, at ``lr_factor`` times the learning rate of the rest (its own parameter
    group; LR schedulers are told about it). Built on Lightning's
    :class:`~lightning.pytorch.callbacks.BaseFinetuning`, which keeps the group across resumes; unlike
    ``BackboneFinetuning`` the module is named by a path, so any task and network exposing its
    encoder works.

    How the encoder is held fixed (``freeze_by``):

    - ``requires_grad``: its parameters stop requiring gradients and join the optimiser when
      unfrozen; no backward pass runs through the frozen encoder (faster).
    - ``gradients``: its parameters keep ``requires_grad``, sit in their own optimiser group from the
      start, and their gradients are dropped before every optimiser step while frozen. DDP only
      synchronises parameters that require gradients when the model is wrapped, so unfreezing by
      ``requires_grad`` there would leave ranks training different encoders (Lightning issue #20340).
    - ``auto`` (default): ``gradients`` when training on several processes, else ``requires_grad``.

    Freezing a *randomly initialised* encoder only wastes epochs (its random features are what the
    decoder would learn on), so the callback does nothing when the network says its encoder was not
    loaded from weights: a module on the ``backbone`` path (the task's ``net``, say) with a boolean
    ``pretrained_encoder`` attribute (:class:`~octlightning.models.smp_net.SMPNet`, the
    layer-regression nets) decides; ``only_if_pretrained=False`` freezes regardless. Networks without
    the attribute are frozen as configured.

    In a config: ``"trainer": {"callbacks": [{"class_path": "octlightning.callbacks.FreezeBackbone",
    "init_args": {"unfreeze_at_epoch": 5, "lr_factor": 0.1}}]}``.

    Args:
        unfreeze_at_epoch: first (0-based) epoch in which the encoder trains; 0 never freezes it.
        lr_factor: the encoder's learning rate relative to the first parameter group's.
        backbone: attribute path from the LightningModule to the encoder (``net.encoder`` is
            :attr:`octlightning.models.smp_net.SMPNet.encoder`).
        train_bn: keep the frozen encoder's BatchNorm layers training (Lightning's default); their
            parameters then stay in the first group throughout.
        freeze_by: ``auto``, ``requires_grad`` or ``gradients`` (see above).
        only_if_pretrained: skip freezing when the network reports a randomly initialised encoder.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int = 5,
        lr_factor: float = 0.1,
        backbone: str = "net.encoder",
        train_bn: bool = True,
        freeze_by: Literal["auto", "requires_grad", "gradients"] = "auto",
        only_if_pretrained: bool = True,
    ) -> None:
        super().__init__()
        if unfreeze_at_epoch < 0 or lr_factor <= 0:
            raise ValueError("FreezeBackbone needs unfreeze_at_epoch >= 0 and lr_factor > 0")
        if freeze_by not in ("auto", "requires_grad", "gradients"):
            raise ValueError(f"freeze_by must be auto, requires_grad or gradients, not {freeze_by!r}")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.lr_factor = lr_factor
        self.backbone = backbone
        self.train_bn = train_bn
        self.freeze_by = freeze_by
        self.only_if_pretrained = only_if_pretrained
        self._by_gradients = freeze_by == "gradients"

    def encoder_is_pretrained(self, pl_module: L.LightningModule) -> bool | None:
        """What the first module on the ``backbone`` path with a ``pretrained_encoder`` flag says (or None)."""
        module: Any = pl_module
        for name in self.backbone.split("."):
            flag = getattr(module, "pretrained_encoder", None)
            if isinstance(flag, bool):
                return flag
            module = getattr(module, name, None)
            if module is None:
                return None
        flag = getattr(module, "pretrained_encoder", None)
        return flag if isinstance(flag, bool) else None

    def backbone_module(self, pl_module: L.LightningModule) -> nn.Module:
        module = pl_module
        for name in self.backbone.split("."):
            module = getattr(module, name, None)
            if module is None:
                raise AttributeError(
                    f"FreezeBackbone: {type(pl_module).__name__} has no module at {self.backbone!r} "
                    f"(set init_args.backbone to the encoder's attribute path)"
                )
        if not isinstance(module, nn.Module):
            raise TypeError(f"FreezeBackbone: {self.backbone!r} is a {type(module).__name__}, not an nn.Module")
        return module

    def _encoder_params(self, pl_module: L.LightningModule) -> list[nn.Parameter]:
        """The parameters that are frozen: all of the encoder's, BatchNorm's excepted with ``train_bn``."""
        return list(self.filter_params(self.backbone_module(pl_module), train_bn=self.train_bn, requires_grad=True))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.only_if_pretrained and self.unfreeze_at_epoch > 0 and self.encoder_is_pretrained(pl_module) is False:
            rank_zero_info(
                f"FreezeBackbone: {self.backbone} was not loaded from pretrained weights; it trains from the "
                f"first epoch at the full learning rate (freezing random features teaches nothing)"
            )
            self.unfreeze_at_epoch = 0
            self.lr_factor = 1.0
        if self.freeze_by == "auto":
            self._by_gradients = trainer.world_size > 1
        elif self.freeze_by == "requires_grad" and trainer.world_size > 1:
            rank_zero_warn("FreezeBackbone(freeze_by='requires_grad') under DDP: ranks' encoders will diverge")
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.unfreeze_at_epoch > 0 and not self._by_gradients:
            self.freeze(self.backbone_module(pl_module), train_bn=self.train_bn)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restarting = self._restarting
        super().on_fit_start(trainer, pl_module)  # a resumed run gets its stored groups back here
        if restarting:
            # The schedulers were built by configure_optimizers for the groups of a fresh run; the
            # encoder's group restored above needs its entry too before their state is loaded.
            for optimizer in trainer.optimizers:
                self._extend_schedulers(trainer, optimizer)
            return
        if not self._by_gradients or self.unfreeze_at_epoch == 0:
            return
        # Move the encoder's parameters out of the group(s) the task built into one of their own.
        encoder = {id(p) for p in self._encoder_params(pl_module)}
        optimizer = trainer.optimizers[0]
        moved = [p for g in optimizer.param_groups for p in g["params"] if id(p) in encoder]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in encoder]
        if moved:
            optimizer.add_param_group({"params": moved, "lr": optimizer.param_groups[0]["lr"] * self.lr_factor})
            self._extend_schedulers(trainer, optimizer)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        # Gradients were already averaged across ranks: dropping them everywhere keeps ranks equal,
        # and optimisers skip parameters without a gradient (no update, no moments, no weight decay).
        if self._by_gradients and trainer.current_epoch < self.unfreeze_at_epoch:
            for p in self._encoder_params(pl_module):
                p.grad = None

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        # ">=" rather than "==": a run resumed after the unfreeze epoch starts with a frozen encoder too.
        if self._by_gradients or epoch < self.unfreeze_at_epoch:
            return
        module = self.backbone_module(pl_module)
        frozen = [p for p in module.parameters() if not p.requires_grad]
        if not frozen:
            return
        self.make_trainable(module)
        # By identity: Lightning's filter_on_optimizer compares values, and two freshly initialised
        # BatchNorm weights (all ones) would wrongly count as the same parameter.
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [p for p in frozen if id(p) not in present]
        if not new:  # a resumed run: Lightning already restored the encoder's parameter group
            return
        optimizer.add_param_group({"params": new, "lr": optimizer.param_groups[0]["lr"] * self.lr_factor})
        self._extend_schedulers(pl_module.trainer, optimizer)

    def _extend_schedulers(self, trainer: L.Trainer, optimizer: Optimizer) -> None:
        """Give the optimiser's LR schedulers an entry for each group they lack (LambdaLR etc. fail without).

        A group added here runs at ``lr_factor`` times the first group's base rate, on the first group's
        schedule; a resumed run then loads the stored values over these.
        """
        n = len(optimizer.param_groups)
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if getattr(sched, "optimizer", None) is not optimizer:
                continue
            base_lrs = getattr(sched, "base_lrs", None)
            while isinstance(base_lrs, list) and 0 < len(base_lrs) < n:
                optimizer.param_groups[len(base_lrs)].setdefault("initial_lr", base_lrs[0] * self.lr_factor)
                base_lrs.append(base_lrs[0] * self.lr_factor)
            for name in ("lr_lambdas", "min_lrs"):
                values = getattr(sched, name, None)
                while isinstance(values, list) and 0 < len(values) < n:
                    values.append(values[0])
            last = getattr(sched, "_last_lr", None)
            while isinstance(last, list) and 0 < len(last) < n:
                last.append(optimizer.param_groups[len(last)]["lr"])


class ThresholdedJaccard(L.Callback):
    """The ISIC 2018 Task 1 score on the test set: a per-image column and the epoch mean.

    Adds ``thresholded_jaccard`` (:func:`octlightning.metrics.thresholded_jaccard`: the image's IoU,
    0 below ``threshold``) to every per-image row of a task that keeps result rows with an ``iou``
    column (:class:`~octlightning.tasks.segmentation.SegmentationTask`), so it lands in
    ``test_metrics.csv``, and logs their mean as ``test/thresholded_jaccard`` (summed over DDP ranks).
    The IoU is the test step's, at each image's original size for resized inputs (the challenge's
    protocol); an image with neither a reference nor a predicted lesion (IoU NaN) is skipped by the mean,
    as every other table skips it. It runs as a callback so that any such task gets it without a task option.

    Args:
        threshold: Jaccard below which an image counts as 0 (0.65 in the challenge).
    """

    def __init__(self, threshold: float = ISIC_JACCARD_THRESHOLD) -> None:
        self.threshold = threshold

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Callbacks run before the module's hook, which gathers and writes these rows (BaseTask).
        rows = [r for r in getattr(pl_module, "result_rows", []) if "iou" in r]
        scores = thresholded_jaccard([float(r["iou"]) for r in rows], self.threshold)
        for row, value in zip(rows, scores.tolist(), strict=True):
            row["thresholded_jaccard"] = value
        defined = ~torch.isnan(scores)
        total = trainer.strategy.reduce(
            torch.tensor([float(scores[defined].sum()), float(defined.sum())], device=pl_module.device),
            reduce_op="sum",
        )
        if total[1] > 0:
            pl_module.log("test/thresholded_jaccard", total[0] / total[1], sync_dist=False)


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
        run_dir = getattr(pl_module, "run_dir", None) or Path(trainer.log_dir or trainer.default_root_dir)
        path = Path(run_dir) / self.folder / volume / self.filename
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
        run_dir = getattr(pl_module, "run_dir", None) or Path(trainer.log_dir or trainer.default_root_dir)
        for i, sample_id in enumerate(batch["id"]):
            h, w = (int(v) for v in batch["size"][i]) if "size" in batch else labels.shape[-2:]
            name = str(batch["stem"][i]) if "stem" in batch else str(sample_id)
            values = self._info.to_values(labels[i, :h, :w].cpu().numpy())
            path = Path(run_dir) / self.folder / f"{name}_pred.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(values).save(path)
            self.written.append(path)


class WarmupEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` that starts counting patience after the learning-rate warm-up and
    says when the best epoch was the first one.

    During the first ``warmup_epochs`` epochs (``None``: the task's ``warmup_epochs``, 0 without one)
    the best value is tracked but stalled validations are not counted, so a run cannot stop while its
    learning rate is still rising. When training ends and the best monitored value is still the one of
    the first validation, a warning says so: the checkpoint kept is an untrained network, which
    otherwise passes unnoticed (a network stuck at a constant prediction "improves" only once).

    Args:
        monitor, patience: as for ``EarlyStopping`` (validations without improvement before stopping).
        mode: ``min``/``max``; ``None`` takes the task's ``monitor_mode`` (``min`` without one).
        warmup_epochs: epochs before patience counts.
        **kwargs: further :class:`~lightning.pytorch.callbacks.EarlyStopping` arguments (``patience``, ...).
    """

    def __init__(
        self,
        monitor: str,
        patience: int = 3,
        *,
        mode: str | None = None,
        warmup_epochs: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(monitor=monitor, patience=patience, mode=mode or "min", **kwargs)
        self._mode_from_task = mode is None
        self.warmup_epochs = warmup_epochs
        self.best_epoch: int | None = None
        self.first_epoch: int | None = None
        self.validations = 0  # monitored validations seen (a single one has nothing to compare)
        self._epoch = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        mode = getattr(pl_module, "monitor_mode", "min")
        if self._mode_from_task and mode != self.mode:
            if mode not in self.mode_dict:
                raise ValueError(f"WarmupEarlyStopping: the task's monitor_mode {mode!r} is neither min nor max")
            # What EarlyStopping.__init__ derives from the mode (checkpoint restore comes after setup).
            self.mode = mode
            self.min_delta = abs(self.min_delta) * (1 if self.monitor_op == torch.gt else -1)
            self.best_score = torch.tensor(torch.inf if self.monitor_op == torch.lt else -torch.inf)
        if self.warmup_epochs is None:
            self.warmup_epochs = int(getattr(pl_module, "warmup_epochs", 0) or 0)

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        self._epoch = trainer.current_epoch
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        before = self.best_score.clone()
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if self.first_epoch is None:
            self.first_epoch = self._epoch
        self.validations += 1
        if not torch.equal(before.to(self.best_score.device), self.best_score):
            self.best_epoch = self._epoch
        if self._epoch < (self.warmup_epochs or 0) and torch.isfinite(current):
            self.wait_count = 0  # warm-up: record the best, count nothing
            return False, reason
        return should_stop, reason

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or self.best_epoch is None or self.validations < 2:
            return
        if self.best_epoch == self.first_epoch:
            rank_zero_warn(
                f"WarmupEarlyStopping: the best {self.monitor} ({float(self.best_score):.4g}) is the one of the first "
                f"validated epoch ({self.best_epoch}); nothing later improved on it, so the kept checkpoint is "
                f"an (almost) untrained network. Check the learning rate, the loss and the data."
            )

    def state_dict(self) -> dict[str, Any]:
        extra = {"best_epoch": self.best_epoch, "first_epoch": self.first_epoch, "validations": self.validations}
        return {**super().state_dict(), **extra}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.best_epoch = state.pop("best_epoch", None)
        self.first_epoch = state.pop("first_epoch", None)
        self.validations = state.pop("validations", 0)
        super().load_state_dict(state)


def constant_prediction_loss(pl_module: L.LightningModule, batch: dict[str, Any]) -> Tensor | None:
    """The task's loss on ``batch`` for the best constant prediction, or None when it cannot be formed.

    Tasks may define ``constant_loss(batch)`` (layer regression: each boundary's mean row). A task with
    a ``loss_fn(logits, mask, valid)`` and batches with ``mask`` (segmentation) gets constant logits from
    the batch's class frequencies (over valid pixels): ``log p`` per class, or the logit of the
    foreground fraction for a binary (one-channel) task.
    """
    own = getattr(pl_module, "constant_loss", None)
    if callable(own):
        return own(batch)
    loss_fn = getattr(pl_module, "loss_fn", None)
    if loss_fn is None or "mask" not in batch or "image" not in batch:
        return None
    mask = batch["mask"]
    mask = mask[:, 0] if mask.dim() == 4 else mask
    valid_mask = getattr(pl_module, "valid_mask", None)
    valid = valid_mask(batch) if callable(valid_mask) else None
    v = torch.ones_like(mask, dtype=torch.bool) if valid is None else (valid[:, 0] if valid.dim() == 4 else valid)
    v = v.bool()
    b, (h, w) = mask.shape[0], mask.shape[-2:]
    if getattr(pl_module, "binary", False):
        p = (mask.float() * v).sum() / v.sum().clamp_min(1)
        p = p.clamp(1e-4, 1 - 1e-4)
        logits = torch.log(p / (1 - p)).view(1, 1, 1, 1).expand(b, 1, h, w)
    else:
        k = int(pl_module.num_classes)
        counts = torch.bincount(mask[v].long().clamp(0, k - 1), minlength=k).float()
        freq = (counts / counts.sum().clamp_min(1)).clamp_min(1e-6)
        logits = freq.log().view(1, k, 1, 1).expand(b, k, h, w)
    return loss_fn(logits.to(mask.device), batch["mask"], valid)


class BeatConstantBaseline(L.Callback):
    """Warn when a run's training loss never beats that of a constant prediction.

    A network that learns nothing converges to the best constant output (the mean row of each boundary,
    the class frequencies), and its loss then looks like a plateau rather than a failure. Each training
    batch's loss is compared with :func:`constant_prediction_loss` on the same (augmented) batch;
    epoch means are summed over DDP ranks. If after ``check_after_epochs`` epochs (checked at every
    later epoch end) no epoch's mean training loss was below ``margin`` times the constant
    prediction's, a warning says so, once. Costs one loss evaluation per batch, no network pass.

    Args:
        check_after_epochs: epochs given to the network before the first warning.
        margin: the fraction of the constant loss an epoch must get below to count as learning.
    """

    def __init__(self, check_after_epochs: int = 3, margin: float = 0.9) -> None:
        self.check_after_epochs = check_after_epochs
        self.margin = margin
        self.beaten = False
        self.warned = False
        self.epochs: list[tuple[float, float]] = []  # (mean training loss, mean constant loss) per epoch
        self._sums = torch.zeros(3, dtype=torch.float64)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums.zero_()

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not isinstance(batch, dict):
            return
        constant = constant_prediction_loss(pl_module, batch)
        if constant is None:
            return
        self._sums += torch.tensor([float(loss.detach()), float(constant), 1.0], dtype=torch.float64)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sums = trainer.strategy.reduce(self._sums.to(pl_module.device, torch.float32), reduce_op="sum")
        if float(sums[2]) == 0:
            return
        train, constant = float(sums[0] / sums[2]), float(sums[1] / sums[2])
        self.epochs.append((train, constant))
        self.beaten = self.beaten or train < self.margin * constant
        if len(self.epochs) >= self.check_after_epochs:
            self._maybe_warn()

    def _maybe_warn(self) -> None:
        if self.beaten or self.warned:
            return
        self.warned = True
        train, constant = self.epochs[-1]
        rank_zero_warn(
            f"BeatConstantBaseline: after {len(self.epochs)} epoch(s) the training loss ({train:.4g}) has never "
            f"been below {self.margin:g} x that of the best constant prediction ({constant:.4g}): the network "
            f"is not learning. Check the learning rate, the head/loss and the data."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"beaten": self.beaten, "warned": self.warned, "epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.beaten = bool(state_dict.get("beaten", False))
        self.warned = bool(state_dict.get("warned", False))
        self.epochs = [tuple(e) for e in state_dict.get("epochs", [])]
