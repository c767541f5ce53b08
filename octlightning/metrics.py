"""Per-sample metrics that torchmetrics does not provide in the form the result tables need.

Epoch-level metrics come from torchmetrics (synced across DDP ranks); these helpers score one image at
a time for the per-image CSVs and implement challenge-specific definitions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def valid_from_sizes(sizes: Tensor, height: int, width: int) -> Tensor:
    """``(B, H, W)`` bool mask that is true inside each sample's original (unpadded) ``size``."""
    rows = torch.arange(height, device=sizes.device).view(1, -1, 1)
    cols = torch.arange(width, device=sizes.device).view(1, 1, -1)
    return (rows < sizes[:, 0].view(-1, 1, 1)) & (cols < sizes[:, 1].view(-1, 1, 1))


def confusion_counts(pred: Tensor, target: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """Per-class ``(tp, fp, fn, tn)`` counts inside ``valid`` for one image: ``(K, 4)`` float64.

    ``pred``/``target`` are label maps (``(H, W)`` integers); binary problems use ``num_classes=2``.
    """
    p = pred[valid].long()
    t = target[valid].long()
    rows = []
    for k in range(num_classes):
        pk, tk = p == k, t == k
        tp = (pk & tk).sum()
        fp = (pk & ~tk).sum()
        fn = (~pk & tk).sum()
        tn = (~pk & ~tk).sum()
        rows.append(torch.stack([tp, fp, fn, tn]))
    return torch.stack(rows).double()


def scores_from_counts(counts: Tensor) -> dict[str, Tensor]:
    """Dice, IoU, sensitivity, specificity, accuracy per class from ``(K, 4)`` counts.

    A class absent from both prediction and reference scores Dice = IoU = 1 (nothing to find, nothing
    found), the convention of the medical segmentation challenges.
    """
    tp, fp, fn, tn = counts.unbind(-1)
    empty = (tp + fp + fn) == 0
    one = torch.ones_like(tp)
    dice = torch.where(empty, one, 2 * tp / (2 * tp + fp + fn).clamp_min(1))
    iou = torch.where(empty, one, tp / (tp + fp + fn).clamp_min(1))
    sens = torch.where(tp + fn == 0, one, tp / (tp + fn).clamp_min(1))
    spec = torch.where(tn + fp == 0, one, tn / (tn + fp).clamp_min(1))
    acc = (tp + tn) / counts.sum(-1).clamp_min(1)
    return {"dice": dice, "iou": iou, "sensitivity": sens, "specificity": spec, "accuracy": acc}
