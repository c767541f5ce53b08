"""Binary and multi-class segmentation for any ``nn.Module`` that maps images to logits."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn
from torchmetrics import classification as tmc
from torchmetrics.functional.classification import binary_auroc

from octlightning.inference import sliding_window as tiled_inference
from octlightning.losses import build_segmentation_loss
from octlightning.metrics import (
    SliceCounts,
    confusion_counts,
    dice_iou_from_stat_scores,
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

    Args:
        net: the network; outputs ``(B, num_classes, H, W)`` logits (``(B, 1, H, W)`` for binary).
        num_classes: 1 for binary (sigmoid) segmentation, else the number of classes incl. background.
        loss: loss name from :data:`octlightning.losses.SEGMENTATION_LOSSES` (``bce``, ``dice_bce``,
            ``dice_ce``, ``ce_gdice``, ...), or any loss module (``class_path`` in a config) taking
            ``(logits, target, valid)`` (see :func:`octlightning.losses.build_segmentation_loss`).
        class_names: names for per-class metrics (multi-class; default ``class1``, ...).
        threshold: probability threshold for binary masks.
        auroc: also track AUROC (binary; binned, 200 thresholds).
        monitor: validation metric for checkpoints/early stopping (default ``val/dice``, maximised).
        sliding_window: ``[height, width]`` tile for validation/test/predict forwards (networks trained on
            patches); tiles overlap by ``sliding_window_overlap`` and are blended with
            ``sliding_window_blend`` weights (:func:`octlightning.inference.sliding_window`). ``None``
            runs the network on the whole (padded) image.
        hd95: also score each test image's classes by the 95th-percentile Hausdorff distance in pixels
            (:func:`octlightning.metrics.hd95_per_class`: 0 when a class is absent from both prediction and
            reference, the image diagonal when absent from one); volumes get the mean over their slices,
            and both test tables end with a ``mean`` row.
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
        super().__init__(lr, weight_decay, optimizer, scheduler, warmup_epochs, channels_last, compile)
        # A loss module is part of the model's state (checkpoint), like the network; a name is a hyperparameter.
        self.save_hyperparameters(ignore=["net", "loss"] if isinstance(loss, nn.Module) else ["net"])
        self.net = net
        self.num_classes = num_classes
        self.binary = num_classes == 1
        self.loss_fn = build_segmentation_loss(loss)
        n_fg = 1 if self.binary else num_classes - 1
        self.class_names = class_names or [f"class{k}" for k in range(1, n_fg + 1)]
        if len(self.class_names) != n_fg:
            raise ValueError(f"class_names has {len(self.class_names)} names for {n_fg} foreground classes")
        self.threshold = threshold
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.use_auroc = auroc and self.binary
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()
        self.val_loss = torchmetrics.MeanMetric()
        self.sliding_window = sliding_window
        self.sliding_window_overlap = sliding_window_overlap
        self.sliding_window_blend = sliding_window_blend
        self.hd95 = hd95

    def _make_metrics(self) -> torchmetrics.MetricCollection:
        if self.binary:
            metrics = {
                "dice": tmc.BinaryF1Score(threshold=self.threshold),
                "iou": tmc.BinaryJaccardIndex(threshold=self.threshold),
                "accuracy": tmc.BinaryAccuracy(threshold=self.threshold),
                "sensitivity": tmc.BinaryRecall(threshold=self.threshold),
                "specificity": tmc.BinarySpecificity(threshold=self.threshold),
            }
            if self.use_auroc:
                metrics["auroc"] = tmc.BinaryAUROC(thresholds=200)
        else:
            k = self.num_classes
            # Per-class Dice/IoU come from the counts (see _log_metrics): a class absent from both
            # reference and prediction is undefined there, not a score of 0 (torchmetrics' F1).
            metrics = {
                "stats": tmc.MulticlassStatScores(k, average="none"),
                "accuracy": tmc.MulticlassAccuracy(k, average="micro"),
            }
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
        """``(B, H, W)`` label map from probabilities."""
        return (probs[:, 0] >= self.threshold).long() if self.binary else probs.argmax(1)

    def _update(self, metrics: torchmetrics.MetricCollection, probs: Tensor, target: Tensor, valid: Tensor):
        if self.binary:
            metrics.update(probs[:, 0][valid], target[valid].long())
        else:
            metrics.update(probs.permute(0, 2, 3, 1)[valid], target[valid].long())

    def _log_metrics(self, metrics: torchmetrics.MetricCollection, prefix: str) -> dict[str, float]:
        values = metrics.compute()  # synced over DDP ranks by torchmetrics
        metrics.reset()
        flat: dict[str, Tensor] = {}
        stats = values.pop("stats", None)
        if stats is not None:  # multi-class: (K, 5) tp, fp, tn, fn, support
            for name, value in dice_iou_from_stat_scores(stats).items():
                fg = value[1:]
                for cname, v in zip(self.class_names, fg, strict=True):
                    flat[f"{prefix}/{name}_{cname}"] = v
                # mean over the foreground classes present in reference or prediction
                flat[f"{prefix}/{name}"] = fg.nanmean()
        for name, value in values.items():
            flat[f"{prefix}/{name}"] = value
        for key, value in flat.items():
            self.log(key, value.float(), prog_bar=key == f"{prefix}/dice")
        return {k: float(v) for k, v in flat.items()}

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

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits, _, valid = self._step(batch)
        probs = self.probabilities(logits)
        target = batch["mask"][:, 0]
        self._update(self.test_metrics, probs, target, valid)
        labels = self.labels(probs)
        k = 2 if self.binary else self.num_classes
        for i, sample_id in enumerate(batch["id"]):
            counts = confusion_counts(labels[i], target[i], valid[i], k)
            row: dict[str, Any] = {"id": sample_id}
            if "volume" in batch:
                row["volume"] = batch["volume"][i]
            hd95 = None
            if self.hd95:  # on the unpadded image, so that the diagonal is the image's own
                h, w = (int(v) for v in batch["size"][i]) if "size" in batch else labels.shape[-2:]
                hd95 = hd95_per_class(labels[i, :h, :w], target[i, :h, :w], k, valid[i, :h, :w])
                row["_hd95"] = hd95
            row.update(self._score_row(counts, hd95))
            if self.use_auroc:
                t = target[i][valid[i]].long()
                if 0 < int(t.sum()) < t.numel():
                    row["auroc"] = float(binary_auroc(probs[i, 0][valid[i]], t, thresholds=200))
            # Raw counts travel with the row so that volumes can be scored from summed counts.
            row["_counts"] = counts.cpu()
            if "voxel_mm3" in batch:
                row["_voxel_mm3"] = float(batch["voxel_mm3"][i])
            self.add_result_row(row)

    def _score_row(self, counts: Tensor | None, hd95: Any = None) -> dict[str, float]:
        """Mean foreground scores (and per class for multi-class) from ``(K, 4)`` confusion counts."""
        return score_row(counts, None if self.binary else self.class_names, hd95)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
        rows = self.gather_result_rows()
        table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        if self.hd95 and table:
            table.append(mean_row(table, "id"))
        self.write_csv(table, "test_metrics.csv")
        if rows and "volume" in rows[0]:
            slices = [SliceCounts(r["volume"], r["_counts"], r.get("_hd95"), r.get("_voxel_mm3")) for r in rows]
            volumes = score_volumes(slices, None if self.binary else self.class_names)
            if self.hd95:
                volumes.append(mean_row(volumes, "volume"))
            self.write_csv(volumes, "test_volumes.csv")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Write mask/overlay PNGs per image; return the padded label maps (uint8) for writers such as
        :class:`~octlightning.callbacks.WriteVolumes`."""
        probs = self.probabilities(self.predict_logits(batch["image"]))
        labels = self.labels(probs)
        out = self.run_dir / "predictions"
        for i, sample_id in enumerate(batch["id"]):
            h, w = (int(v) for v in batch["size"][i]) if "size" in batch else probs.shape[-2:]
            prob, image = probs[i : i + 1, :, :h, :w], batch["image"][i : i + 1, :, :h, :w].float()
            if "file_size" in batch:  # inputs were resized: write each at its file's own size
                size = [int(v) for v in batch["file_size"][i]]
                prob = torch.nn.functional.interpolate(prob, size=size, mode="bilinear", align_corners=False)
                image = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
            lab = self.labels(prob)[0].cpu().numpy().astype(np.uint8)
            if self.binary:
                save_png((prob[0, 0].cpu().numpy() * 255).round().astype(np.uint8), out / f"{sample_id}_prob.png")
                save_png(lab * 255, out / f"{sample_id}_mask.png")
            else:
                save_png(lab, out / f"{sample_id}_mask.png")
            save_png(overlay(to_display(image[0]), lab), out / f"{sample_id}_overlay.png")
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
