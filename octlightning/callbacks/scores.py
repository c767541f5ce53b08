"""Test-time scores computed from a task's per-image rows: the ISIC 2018 thresholded Jaccard."""

from __future__ import annotations

import lightning as L
import torch

from octlightning.metrics import ISIC_JACCARD_THRESHOLD, thresholded_jaccard


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
