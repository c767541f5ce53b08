"""Binary and multi-class segmentation for any ``nn.Module`` that maps images to logits."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn
from torchmetrics import classification as tmc
from torchmetrics.functional.classification import binary_auroc

from octlightning.errors import ConfigError
from octlightning.inference import sliding_window as tiled_inference
from octlightning.losses import build_segmentation_loss
from octlightning.metrics import (
    SliceCounts,
    binarise,
    confusion_counts,
    counts_from_stat_scores,
    hd95_per_class,
    mean_row,
    score_row,
    score_volumes,
    valid_from_sizes,
)
from octlightning.tasks.base import BaseTask
from octlightning.visualize import overlay, save_png, to_display


class SegmentationTask(BaseTask):
    """Segmentation LightningModule.

    Batches are dicts with ``image`` ``(B, C, H, W)``, ``mask`` ``(B, 1, H, W)`` (labels), optionally
    ``fov`` ``(B, 1, H, W)`` (pixels that count), ``size`` (original height/width before padding) and
    ``id``. Losses and metrics only see pixels inside ``fov`` and inside ``size``.

    Test scores follow the published protocols (conventions in :mod:`octlightning.metrics`): where the
    DataModule resized its inputs (``file_size``, with the reference as stored in ``file_mask``: ISIC),
    every test score is computed at the file's own size, on the probabilities upsampled exactly as
    ``predict`` writes them; a class absent from both reference and prediction is NaN in ``test/*``,
    ``test_metrics.csv`` and ``test_volumes.csv`` alike (nnU-Net's convention); binary masks are
    ``p >= threshold`` everywhere.

    Args:
        net: the network; outputs ``(B, num_classes, H, W)`` logits (``(B, 1, H, W)`` for binary).
        num_classes: 1 for binary (sigmoid) segmentation, else the number of classes incl. background.
        loss: loss name from :data:`octlightning.losses.SEGMENTATION_LOSSES` (``bce``, ``dice_bce``,
            ``dice_ce``, ``ce_gdice``, ...), or any loss module (``class_path`` in a config) taking
            ``(logits, target, valid)`` (see :func:`octlightning.losses.build_segmentation_loss`).
        class_names: names for per-class metrics (multi-class; default ``class1``, ...).
        threshold: probability threshold for binary masks (foreground where ``p >= threshold``).
        auroc: also track the ROC AUC (binary) over the pixels that count (the FOV for fundus images).
        auroc_thresholds: ``val/auroc`` is binned over this many thresholds (faster, within about 1e-3
            of the exact value); ``None`` makes it exact.
        test_auroc_thresholds: ``test/auroc`` and the per-image ``auroc`` column are exact by default
            (torchmetrics ``BinaryAUROC(thresholds=None)``, equal to ``sklearn.metrics.roc_auc_score`` on
            the same pixels: the DRIVE protocol); it keeps every scored pixel (5 bytes each), so very large
            test sets (ISIC at original size) can bin it over this many thresholds instead.
        monitor: checkpoint / early-stopping metric (``val/dice``).
        monitor_mode: ``max`` for Dice, IoU, AUROC; ``min`` for a loss or a distance.
        sliding_window: ``[height, width]`` tile for validation/test/predict forwards (networks trained on
            patches); tiles overlap by ``sliding_window_overlap`` and are blended with
            ``sliding_window_blend`` weights (:func:`octlightning.inference.sliding_window`). ``None``
            runs the network on the whole (padded) image.
        sliding_window_overlap: fraction of a tile shared by neighbouring tiles, in ``[0, 1)``.
        sliding_window_blend: tile weighting: ``gaussian`` (centre-weighted, as nnU-Net), ``linear`` or
            ``constant``.
        hd95: also score each test image's classes by the 95th-percentile Hausdorff distance
            (:func:`octlightning.metrics.hd95_per_class`: NaN when a class is absent from both prediction
            and reference, the image diagonal when absent from one), in mm where the samples carry the
            volume's ``spacing`` (column ``hd95_mm``, RETOUCH), else in pixels (``hd95_px``); volumes get
            the mean over their slices, and both test tables end with a ``mean`` row.
        lr, weight_decay, optimizer, scheduler, warmup_epochs, channels_last, compile: see
            :class:`~octlightning.tasks.base.BaseTask`.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 1,
        loss: str | nn.Module = "dice_bce",
        class_names: list[str] | None = None,
        threshold: float = 0.5,
        auroc: bool = True,
        auroc_thresholds: int | None = 200,
        test_auroc_thresholds: int | None = None,
        monitor: str = "val/dice",
        monitor_mode: Literal["min", "max"] = "max",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        scheduler: Literal["none", "cosine", "plateau", "step"] = "none",
        warmup_epochs: int = 0,
        channels_last: bool = True,
        compile: bool = False,
        sliding_window: list[int] | None = None,
        sliding_window_overlap: float = 0.5,
        sliding_window_blend: Literal["gaussian", "linear", "constant"] = "gaussian",
        hd95: bool = False,
    ) -> None:
        super().__init__(
            net, monitor=monitor, monitor_mode=monitor_mode, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
            scheduler=scheduler, warmup_epochs=warmup_epochs, channels_last=channels_last, compile=compile,
        )  # fmt: skip
        # A loss module is part of the model's state (checkpoint), like the network; a name is a hyperparameter.
        self.save_hyperparameters(ignore=["net", "loss"] if isinstance(loss, nn.Module) else ["net"])
        self.num_classes = num_classes
        self.binary = num_classes == 1
        self.loss_fn = build_segmentation_loss(loss)
        n_fg = 1 if self.binary else num_classes - 1
        self.class_names = class_names or [f"class{k}" for k in range(1, n_fg + 1)]
        if len(self.class_names) != n_fg:
            raise ConfigError(
                f"--model.init_args.class_names has {len(self.class_names)} names for {n_fg} foreground classes"
            )
        self.threshold = threshold
        self.use_auroc = auroc and self.binary
        self.test_auroc_thresholds = test_auroc_thresholds
        self.val_metrics = self._make_metrics(auroc_thresholds)
        self.test_metrics = self._make_metrics(test_auroc_thresholds)
        self.sliding_window = sliding_window
        self.sliding_window_overlap = sliding_window_overlap
        self.sliding_window_blend = sliding_window_blend
        self.hd95 = hd95

    def _make_metrics(self, auroc_thresholds: int | None) -> torchmetrics.MetricCollection:
        """Epoch metrics: per-class confusion counts of the label maps (scored by
        :func:`~octlightning.metrics.scores_from_counts`, as every CSV row is) and, binary, the ROC AUC."""
        k = 2 if self.binary else self.num_classes
        metrics: dict[str, torchmetrics.Metric] = {"stats": tmc.MulticlassStatScores(k, average="none")}
        if self.use_auroc:
            metrics["auroc"] = tmc.BinaryAUROC(thresholds=auroc_thresholds)
        return torchmetrics.MetricCollection(metrics)

    # ----------------------------------------------------------------- helpers
    def forward(self, x: Tensor) -> Tensor:
        return self.run_net(x)

    def predict_logits(self, x: Tensor) -> Tensor:
        """Logits for a batch: tiled and blended outside training when ``sliding_window`` is set."""
        if self.sliding_window is None or self.training:
            return self.run_net(x)
        return tiled_inference(
            self.run_net, x, self.sliding_window, self.sliding_window_overlap, self.sliding_window_blend
        )

    def valid_mask(self, batch: dict[str, Any]) -> Tensor:
        """``(B, H, W)`` bool: inside the FOV (when given) and inside the unpadded image."""
        h, w = batch["image"].shape[-2:]
        if "size" in batch:
            valid = valid_from_sizes(batch["size"], h, w)
        else:
            valid = torch.ones(batch["image"].shape[0], h, w, dtype=torch.bool, device=batch["image"].device)
        if "fov" in batch:
            valid = valid & (batch["fov"][:, 0] > 0)
        return valid

    def probabilities(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        return torch.sigmoid(logits) if self.binary else logits.softmax(1)

    def labels(self, probs: Tensor) -> Tensor:
        """``(B, H, W)`` label map from ``(B, C, H, W)`` probabilities (binary: ``p >= threshold``)."""
        return binarise(probs[:, 0], self.threshold).long() if self.binary else probs.argmax(1)

    @staticmethod
    def at_file_size(x: Tensor, size: Tensor | list[int]) -> Tensor:
        """``(B, C, h, w)`` float resized to the file's ``(height, width)``: bilinear, as ``predict`` writes it."""
        return torch.nn.functional.interpolate(x, size=[int(v) for v in size], mode="bilinear", align_corners=False)

    def _update(self, metrics: torchmetrics.MetricCollection, probs: Tensor, target: Tensor, valid: Tensor):
        """Add ``(B, C, H, W)`` probabilities against ``(B, H, W)`` labels inside ``valid`` to the epoch metrics."""
        t = target[valid].long()
        metrics["stats"].update(self.labels(probs)[valid], t)
        if "auroc" in metrics:
            metrics["auroc"].update(probs[:, 0][valid], t)

    def _log_metrics(self, metrics: torchmetrics.MetricCollection, prefix: str) -> dict[str, float]:
        values = metrics.compute()  # synced over DDP ranks by torchmetrics
        metrics.reset()
        counts = counts_from_stat_scores(values.pop("stats"))
        flat = {f"{prefix}/{k}": v for k, v in self._score_row(counts).items()}
        flat.update({f"{prefix}/{name}": float(value) for name, value in values.items()})
        for key, value in flat.items():
            self.log(key, torch.tensor(value, dtype=torch.float32), prog_bar=key == f"{prefix}/dice")
        return flat

    # ----------------------------------------------------------------- steps
    def _step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.predict_logits(batch["image"])
        valid = self.valid_mask(batch)
        loss = self.loss_fn(logits, batch["mask"], valid)
        return logits, loss, valid

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        _, loss, _ = self._step(batch)
        self.log_training({"train/loss": loss}, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        logits, loss, valid = self._step(batch)
        probs = self.probabilities(logits)
        self.val_loss.update(loss.detach(), weight=batch["image"].shape[0])
        self._update(self.val_metrics, probs, batch["mask"][:, 0], valid)
        return {"probs": probs.detach()} if batch_idx == 0 else None

    def scored_pixels(
        self, batch: dict[str, Any], probs: Tensor, valid: Tensor, i: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample ``i`` as the protocol scores it: ``(1, C, h, w)`` probabilities, ``(h, w)`` reference
        labels and ``(h, w)`` bool pixels that count.

        Cropped to the unpadded ``size``; where the DataModule resized the input (``file_size`` and the
        stored reference ``file_mask``, ISIC), the probabilities are upsampled to the file's size exactly
        as :meth:`predict_step` writes them and scored against the reference as stored (every pixel counts).
        """
        h, w = (int(v) for v in batch["size"][i]) if "size" in batch else probs.shape[-2:]
        prob = probs[i : i + 1, :, :h, :w]
        if "file_mask" in batch:
            target = batch["file_mask"][i][0].to(prob.device).long()
            prob = self.at_file_size(prob, target.shape)
            return prob, target, torch.ones_like(target, dtype=torch.bool)
        return prob, batch["mask"][i, 0, :h, :w].long(), valid[i, :h, :w]

    @staticmethod
    def pixel_spacing(batch: dict[str, Any], i: int) -> tuple[tuple[float, float] | None, str]:
        """``((row, column) pixel size, unit)`` of sample ``i``'s B-scan for HD95, or ``(None, "px")``.

        Samples of a volume carry ``spacing`` (x, y, z) in mm, MetaImage order: a B-scan's rows run
        along y (axial) and its columns along x (lateral).
        """
        if "spacing" in batch and "file_mask" not in batch:
            sp = [float(v) for v in batch["spacing"][i]]
            return (sp[1], sp[0]), "mm"
        return None, "px"

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits, _, valid = self._step(batch)
        probs = self.probabilities(logits)
        k = 2 if self.binary else self.num_classes
        for i, sample_id in enumerate(batch["id"]):
            prob, target, inside = self.scored_pixels(batch, probs, valid, i)
            self._update(self.test_metrics, prob, target[None], inside[None])
            labels = self.labels(prob)[0]
            counts = confusion_counts(labels, target, inside, k)
            row: dict[str, Any] = {"id": sample_id}
            if "volume" in batch:
                row["volume"] = batch["volume"][i]
            hd95, unit = None, "px"
            if self.hd95:  # on the unpadded image, so that the diagonal is the image's own
                spacing, unit = self.pixel_spacing(batch, i)
                hd95 = hd95_per_class(labels, target, k, inside, spacing)
                row["_hd95"], row["_hd95_unit"] = hd95, unit
            row.update(self._score_row(counts, hd95, unit))
            if self.use_auroc:
                t = target[inside]
                if 0 < int(t.sum()) < t.numel():
                    row["auroc"] = float(binary_auroc(prob[0, 0][inside], t, thresholds=self.test_auroc_thresholds))
            # Raw counts travel with the row so that volumes can be scored from summed counts.
            row["_counts"] = counts.cpu()
            if "voxel_mm3" in batch:
                row["_voxel_mm3"] = float(batch["voxel_mm3"][i])
            self.add_result_row(row)

    def _score_row(self, counts: Tensor | None, hd95: Any = None, hd95_unit: str = "px") -> dict[str, float]:
        """Mean foreground scores (and per class for multi-class) from ``(K, 4)`` confusion counts."""
        return score_row(counts, None if self.binary else self.class_names, hd95, hd95_unit)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        rows = self.gather_result_rows()
        units = sorted({r["_hd95_unit"] for r in rows if "_hd95_unit" in r})
        if len(units) > 1:
            raise ValueError(f"test samples mix HD95 units {units}: some carry a pixel spacing and others not")
        unit = units[0] if units else "px"
        table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        if self.hd95 and table:
            table.append(mean_row(table, "id"))
        self.write_csv(table, "test_metrics.csv")
        if rows and "volume" in rows[0]:
            slices = [SliceCounts(r["volume"], r["_counts"], r.get("_hd95"), r.get("_voxel_mm3")) for r in rows]
            volumes = score_volumes(slices, None if self.binary else self.class_names, unit)
            if self.hd95:
                volumes.append(mean_row(volumes, "volume"))
            self.write_csv(volumes, "test_volumes.csv")

    @staticmethod
    def output_name(batch: dict[str, Any], i: int) -> str:
        """The name of sample ``i``'s prediction files: its input file's ``stem`` where the DataModule
        gives it (whether the input came from a split or ``predict_dir``), else its ``id``."""
        return str(batch["stem"][i]) if "stem" in batch else str(batch["id"][i])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Write ``<stem>_mask.png`` (binary: 0/255; multi-class: class indices), binary ``<stem>_prob.png``
        and ``<stem>_overlay.png`` per image, at the file's own size; return the padded label maps (uint8)
        for writers such as :class:`~octlightning.callbacks.WriteVolumes`."""
        probs = self.probabilities(self.predict_logits(batch["image"]))
        labels = self.labels(probs)
        out = self.run_dir / "predictions"
        for i in range(len(batch["id"])):
            name = self.output_name(batch, i)
            h, w = (int(v) for v in batch["size"][i]) if "size" in batch else probs.shape[-2:]
            prob, image = probs[i : i + 1, :, :h, :w], batch["image"][i : i + 1, :, :h, :w].float()
            if "file_size" in batch:  # inputs were resized: write each at its file's own size
                prob = self.at_file_size(prob, batch["file_size"][i])
                image = self.at_file_size(image, batch["file_size"][i])
            lab = self.labels(prob)[0].cpu().numpy().astype(np.uint8)
            if self.binary:
                save_png((prob[0, 0].cpu().numpy() * 255).round().astype(np.uint8), out / f"{name}_prob.png")
                save_png(lab * 255, out / f"{name}_mask.png")
            else:
                save_png(lab, out / f"{name}_mask.png")
            save_png(overlay(to_display(image[0]), lab), out / f"{name}_overlay.png")
        return {"labels": labels.to(torch.uint8)}

    # ----------------------------------------------------------------- overlays for loggers
    def overlay_images(self, batch: dict[str, Any], outputs: dict[str, Tensor]) -> list[tuple[str, np.ndarray]]:
        """Image tinted with the prediction, reference drawn as white contours (see callbacks)."""
        labels = self.labels(outputs["probs"])
        valid = self.valid_mask(batch)
        images = []
        for i, sample_id in enumerate(batch["id"]):
            lab = (labels[i] * valid[i]).cpu().numpy()
            ref = batch["mask"][i, 0].long().cpu().numpy() if "mask" in batch else None
            images.append((str(sample_id), overlay(to_display(batch["image"][i]), lab, ref)))
        return images
