"""Per-sample metrics that torchmetrics does not provide in the form the result tables need.

Epoch-level metrics come from torchmetrics (synced across DDP ranks); these helpers score one image at
a time for the per-image CSVs and implement challenge-specific definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchmetrics
from scipy import ndimage
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


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: pixels of the mask with a 4-neighbour outside it (or the image)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff_percentile(
    pred: np.ndarray,
    ref: np.ndarray,
    percentile: float = 95.0,
    spacing: Sequence[float] | None = None,
) -> float:
    """Symmetric percentile Hausdorff distance between the boundaries of two binary masks (HD95 by default).

    The MONAI / MIRAGE benchmark definition: distances from every boundary pixel of one mask to the
    nearest boundary pixel of the other, the ``percentile``-th value taken in each direction and the
    larger of the two returned (``percentile=100`` is the Hausdorff distance torchmetrics computes).
    torchmetrics 1.9 has no percentile option, hence this function. Distances are in pixels, or in the
    units of ``spacing`` (per axis, e.g. ``(axial_um, lateral_um)``).

    Empty masks: both empty -> 0; one empty -> ``inf`` (callers substitute their convention, see
    :func:`hd95_per_class`).
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    has_pred, has_ref = pred.any(), ref.any()
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return float("inf")
    # Both boundaries lie inside the bounding box of the union: distances computed inside it are exact,
    # and much cheaper than on the whole B-scan. One pixel of margin keeps the image border behaviour.
    union = pred | ref
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(union))
    pred_edge, ref_edge = _surface(pred)[box], _surface(ref)[box]
    to_ref = ndimage.distance_transform_edt(~ref_edge, sampling=spacing)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)[ref_edge]
    return float(max(np.percentile(to_ref, percentile), np.percentile(to_pred, percentile)))


def hd95_per_class(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    num_classes: int,
    valid: np.ndarray | Tensor | None = None,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """HD95 of every foreground class ``1..K-1`` between two ``(H, W)`` label maps: ``(K-1,)`` float64.

    Pixels outside ``valid`` (unannotated, padding) belong to no class. A class absent from both the
    prediction and the reference scores 0; a class present in only one of them scores the image
    diagonal (the largest possible distance), as the MIRAGE benchmark does, so means stay finite.
    """

    def as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)

    pred, target = as_numpy(pred), as_numpy(target)
    inside = np.ones(pred.shape, dtype=bool) if valid is None else as_numpy(valid).astype(bool)
    step = np.ones(2) if spacing is None else np.asarray(spacing, dtype=float)
    diagonal = float(np.hypot(pred.shape[0] * step[0], pred.shape[1] * step[1]))
    out = np.empty(num_classes - 1)
    for k in range(1, num_classes):
        d = hausdorff_percentile((pred == k) & inside, (target == k) & inside, 95.0, spacing)
        out[k - 1] = diagonal if np.isinf(d) else d
    return out


def score_row(
    counts: Tensor | None, class_names: Sequence[str] | None = None, hd95: Sequence[float] | None = None
) -> dict[str, float]:
    """One result-table row from ``(K, 4)`` confusion counts: mean foreground scores, then per class.

    ``class_names`` (one per foreground class) adds ``<score>_<class>`` columns; without them (binary
    problems) the row holds the means only. ``hd95`` (one value per foreground class) adds ``hd95``
    columns; ``counts=None`` gives the HD95 columns alone.
    """
    row: dict[str, float] = {}
    per_class_columns = class_names is not None
    scores: dict[str, list[float]] = {}
    if counts is not None:
        scores = {name: [float(v) for v in per_class[1:]] for name, per_class in scores_from_counts(counts).items()}
    if hd95 is not None:
        scores["hd95"] = [float(v) for v in hd95]
    for name, fg in scores.items():
        row[name] = float(np.mean(fg))
        if per_class_columns:
            row.update({f"{name}_{c}": v for c, v in zip(class_names, fg, strict=True)})
    return row


def mean_row(rows: Sequence[dict[str, Any]], key: str, label: str = "mean") -> dict[str, Any]:
    """Summary row: the mean of every numeric column over ``rows`` (NaN ignored), ``key`` set to ``label``."""
    columns = [c for c in dict.fromkeys(c for r in rows for c in r) if c != key]
    out: dict[str, Any] = {key: label}
    for c in columns:
        values = [r[c] for r in rows if isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool)]
        if values:
            out[c] = float(np.nanmean(values)) if not all(np.isnan(values)) else float("nan")
    return out


@dataclass(frozen=True)
class SliceCounts:
    """One B-scan's share of its volume's scores (see :func:`score_volumes`).

    Attributes:
        volume: the volume id.
        counts: ``(K, 4)`` float64 ``(tp, fp, fn, tn)`` per class, from :func:`confusion_counts`.
        hd95: ``(K-1,)`` HD95 per foreground class (:func:`hd95_per_class`), or ``None``.
        voxel_mm3: volume of one pixel of the B-scan in mm^3 (pixel area x slice distance), or ``None``.
    """

    volume: str
    counts: Tensor
    hd95: np.ndarray | None = None
    voxel_mm3: float | None = None


def score_volumes(slices: Sequence[SliceCounts], class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per-volume result rows, sorted by volume id, from the B-scans of each volume.

    A volume's Dice, IoU, sensitivity, specificity and accuracy come from the summed confusion counts
    of its B-scans (pixel-wise over the whole volume, as RETOUCH and MIRAGE score volumes); its HD95 is
    the mean over its B-scans (MIRAGE's per-scan score), when the slices carry one. When every B-scan
    of a volume has ``voxel_mm3``, each class also gets the reference and predicted volume and their
    absolute difference in mm^3 (``ref_mm3_<class>``, ``pred_mm3_<class>``, ``avd_mm3_<class>``: the
    RETOUCH challenge's absolute volume difference). Columns: ``volume``, ``slices``, then the columns
    of :func:`score_row` (per class with ``class_names``, one per foreground class; without them, for
    binary problems, the means only and volumes under the name ``foreground``). Used by the test step
    (``test_volumes.csv``) and ``octlightning evaluate`` alike; the caller adds a ``mean`` row.

    Raises ValueError when some B-scans carry HD95 and others do not.
    """
    with_hd95 = [s.hd95 is not None for s in slices]
    if any(with_hd95) and not all(with_hd95):
        raise ValueError(f"HD95 given for {sum(with_hd95)} of {len(slices)} B-scans; give it for all or none")
    by_volume: dict[str, list[SliceCounts]] = {}
    for s in slices:
        by_volume.setdefault(str(s.volume), []).append(s)
    names = list(class_names) if class_names is not None else ["foreground"]
    rows = []
    for vid in sorted(by_volume):
        part = by_volume[vid]
        counts = sum(s.counts for s in part)
        row: dict[str, Any] = {"volume": vid, "slices": len(part)}
        row.update(score_row(counts, class_names))
        if all(s.voxel_mm3 is not None for s in part):
            for k, cname in enumerate(names, start=1):
                ref = sum(float(s.counts[k, 0] + s.counts[k, 2]) * s.voxel_mm3 for s in part)  # type: ignore[operator]
                pred = sum(float(s.counts[k, 0] + s.counts[k, 1]) * s.voxel_mm3 for s in part)  # type: ignore[operator]
                row[f"ref_mm3_{cname}"] = ref
                row[f"pred_mm3_{cname}"] = pred
                row[f"avd_mm3_{cname}"] = abs(pred - ref)
        if any(with_hd95):
            row.update(score_row(None, class_names, np.mean([s.hd95 for s in part], axis=0)))
        rows.append(row)
    return rows


def boundary_abs_errors(
    pred: Tensor, target: Tensor, valid: Tensor, row_scale: Tensor, thickness_between: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """Per-column boundary-row errors in *original-image* pixels for layer regression.

    ``pred``/``target``/``valid`` are ``(B, L, W)`` rows in network-input pixels (target NaN where
    unannotated); ``row_scale`` ``(B,)`` is original rows per input row. Returns ``err`` ``(B, L, W)``
    (``|pred - target|``, 0 where invalid) and ``valid``; with ``thickness_between = (upper, lower)``
    also ``thickness_err`` ``(B, W)``, the error of ``lower - upper``, valid where both are annotated.
    """
    valid = valid.bool()
    scale = row_scale.to(pred.dtype).view(-1, 1, 1)
    diff = torch.where(valid, pred - torch.nan_to_num(target), torch.zeros_like(pred)) * scale
    out = {"err": diff.abs(), "valid": valid}
    if thickness_between is not None:
        up, low = thickness_between
        t_valid = valid[:, up] & valid[:, low]
        out["thickness_err"] = torch.where(t_valid, diff[:, low] - diff[:, up], torch.zeros_like(diff[:, 0])).abs()
        out["thickness_valid"] = t_valid
    return out


class BoundaryError(torchmetrics.Metric):
    """Mean absolute boundary error per boundary over annotated columns, in pixels and micrometres.

    Sums and counts are the states (summed across DDP ranks), so the epoch value is the mean over all
    annotated columns of all B-scans, whatever the split into batches and ranks. Micrometre values
    use each sample's axial ``spacing_um`` and skip samples where it is NaN (unknown). ``compute``
    returns ``mae_px``/``mae_um`` ``(L,)`` and, with a thickness pair, scalar ``thickness_mae_px``/
    ``thickness_mae_um``; a value without any counted column is NaN.
    """

    full_state_update = False

    def __init__(self, num_boundaries: int, thickness_between: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.thickness_between = thickness_between
        for name in ("px_sum", "px_n", "um_sum", "um_n"):
            self.add_state(name, torch.zeros(num_boundaries, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("t_px_sum", "t_px_n", "t_um_sum", "t_um_n"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, valid: Tensor, row_scale: Tensor, spacing_um: Tensor) -> None:
        e = boundary_abs_errors(pred.double(), target.double(), valid, row_scale.double(), self.thickness_between)
        known = torch.isfinite(spacing_um)
        um = torch.nan_to_num(spacing_um.double()).view(-1, 1)
        self.px_sum += e["err"].sum((0, 2))
        self.px_n += e["valid"].sum((0, 2))
        self.um_sum += (e["err"][known].sum(2) * um[known]).sum(0)
        self.um_n += e["valid"][known].sum((0, 2))
        if self.thickness_between is not None:
            self.t_px_sum += e["thickness_err"].sum()
            self.t_px_n += e["thickness_valid"].sum()
            self.t_um_sum += (e["thickness_err"][known].sum(1) * um[known, 0]).sum()
            self.t_um_n += e["thickness_valid"][known].sum()

    def compute(self) -> dict[str, Tensor]:
        def mean(total: Tensor, n: Tensor) -> Tensor:
            return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("nan")))

        out = {"mae_px": mean(self.px_sum, self.px_n), "mae_um": mean(self.um_sum, self.um_n)}
        if self.thickness_between is not None:
            out["thickness_mae_px"] = mean(self.t_px_sum, self.t_px_n)
            out["thickness_mae_um"] = mean(self.t_um_sum, self.t_um_n)
        return out


ISIC_JACCARD_THRESHOLD = 0.65


def thresholded_jaccard(
    iou: Tensor | np.ndarray | Sequence[float] | float, threshold: float = ISIC_JACCARD_THRESHOLD
) -> Tensor:
    """The ISIC 2018 Task 1 score of each image: its Jaccard index, or 0 where that is below ``threshold``.

    The challenge ranks by the mean of these values, which penalises images where the segmentation
    fails (Jaccard < 0.65) as total failures instead of partial successes. Returns float64 values
    of the same shape as ``iou``.
    """
    iou = torch.as_tensor(iou, dtype=torch.float64)
    return torch.where(iou < threshold, torch.zeros_like(iou), iou)


def dice_iou_from_stat_scores(stats: Tensor) -> dict[str, Tensor]:
    """Per-class Dice and IoU from torchmetrics ``StatScores(average="none")`` rows (tp, fp, tn, fn, sup).

    A class absent from both reference and prediction gets NaN (undefined), so that averaging with
    ``nanmean`` skips it instead of counting it as a failure (torchmetrics' F1 scores it 0, which caps
    the mean Dice of a dataset without SRF or PED at 1/3 in the RETOUCH recipe).
    """
    tp, fp, _, fn, _ = stats.double().unbind(-1)
    return {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn)}
