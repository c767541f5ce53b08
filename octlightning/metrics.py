"""One implementation of every metric (segmentation scores, the layer recipe's boundary errors), used by
training, ``test`` and ``evaluate`` alike.

One module on purpose, though past 400 lines: the conventions below are stated once and bind every table,
and no table scores with a copy of its own.

Conventions (the same in epoch logs, per-image and per-volume CSVs and ``octlightning evaluate``):

- **Binarisation:** a binary prediction is foreground where ``p >= threshold`` (:func:`binarise`; MONAI's
  ``AsDiscrete(threshold=...)`` rule). Written masks, CSV rows and epoch metrics all score the same
  label maps; torchmetrics only ever sees label maps, never probabilities with its own ``p > t`` rule.
- **A class absent from both reference and prediction** has no Dice, IoU, sensitivity or HD95: the
  value is NaN and means skip it (``nanmean``). This is nnU-Net's convention (``compute_metrics`` in
  ``nnunetv2/evaluation/evaluate_predictions.py`` gives ``2tp / (2tp + fp + fn)`` = NaN and averages
  with ``np.nanmean``). For a binary task an image (or a whole set) with an empty reference and an
  empty prediction is therefore NaN everywhere, never 0 in one table and 1 in another. A class present
  in only one of them scores Dice = IoU = 0 and HD95 = the image diagonal (MIRAGE's bounded worst
  case, so that means stay finite).
- **MIRAGE's published protocol** (``run_seg_eval.py`` of github.com/j-morano/MIRAGE) differs: Dice =
  ``2I / (|R| + |P| + 1e-6)`` per volume, so an absent class scores 0, and HD95 is 0 for a B-scan where
  both are empty. ``octlightning evaluate --protocol mirage`` reproduces it (:func:`mirage_volume_scores`).
- **Units:** HD95 is in the units of the spacing given (mm for RETOUCH volumes, µm for OCT B-scans
  with a known pixel size), else in pixels; the column name says which (:func:`hd95_column`).

Epoch-level counts come from torchmetrics (``MulticlassStatScores``, synced across DDP ranks); the
scores of every table come from :func:`scores_from_counts`. Exact ROC AUC is torchmetrics'
``BinaryAUROC(thresholds=None)`` (equal to ``sklearn.metrics.roc_auc_score``); HD95 is
:func:`hausdorff_percentile`, tested against MONAI's ``compute_hausdorff_distance(percentile=95)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchmetrics
from scipy import ndimage
from torch import Tensor
from torchmetrics.functional.classification import multiclass_stat_scores

HD95_UNITS = ("px", "mm", "um")


def binarise(prob: Tensor, threshold: float) -> Tensor:
    """Foreground where ``prob >= threshold``: the one binarisation rule of every table and written mask."""
    return prob >= threshold


def hd95_column(unit: str) -> str:
    """``hd95_px``, ``hd95_mm`` or ``hd95_um``: the HD95 column name carries its unit."""
    if unit not in HD95_UNITS:
        raise ValueError(f"HD95 unit must be one of {HD95_UNITS}, not {unit!r}")
    return f"hd95_{unit}"


def valid_from_sizes(sizes: Tensor, height: int, width: int) -> Tensor:
    """``(B, H, W)`` bool mask that is true inside each sample's original (unpadded) ``size``."""
    rows = torch.arange(height, device=sizes.device).view(1, -1, 1)
    cols = torch.arange(width, device=sizes.device).view(1, 1, -1)
    return (rows < sizes[:, 0].view(-1, 1, 1)) & (cols < sizes[:, 1].view(-1, 1, 1))


def confusion_counts(pred: Tensor, target: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """Per-class ``(tp, fp, fn, tn)`` counts inside ``valid`` for one image: ``(K, 4)`` float64.

    ``pred``/``target`` are label maps (``(H, W)`` integers); binary problems use ``num_classes=2``.
    The counting is torchmetrics' ``multiclass_stat_scores``, as in the epoch metrics.
    """
    p = pred[valid].long().flatten()
    t = target[valid].long().flatten()
    if p.numel() == 0:
        return torch.zeros(num_classes, 4, dtype=torch.float64)
    stats = multiclass_stat_scores(p, t, num_classes, average="none", validate_args=False)
    return counts_from_stat_scores(stats).cpu()


def scores_from_counts(counts: Tensor) -> dict[str, Tensor]:
    """Dice, IoU, sensitivity, specificity and accuracy per class from ``(K, 4)`` ``(tp, fp, fn, tn)`` counts.

    The arithmetic definitions, with 0/0 = NaN (nnU-Net's convention): a class absent from both
    reference and prediction has no Dice or IoU, a class absent from the reference no sensitivity.
    Returns float64 tensors of shape ``(K,)``.
    """
    tp, fp, fn, tn = counts.double().unbind(-1)

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
    }


def counts_from_stat_scores(stats: Tensor) -> Tensor:
    """torchmetrics ``StatScores(average="none")`` rows ``(tp, fp, tn, fn, support)`` -> ``(K, 4)`` float64
    ``(tp, fp, fn, tn)``, the order of :func:`confusion_counts`."""
    tp, fp, tn, fn, _ = stats.double().unbind(-1)
    return torch.stack([tp, fp, fn, tn], -1)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: pixels of the mask with a 4-neighbour outside it (or the image)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


Spacing = float | Sequence[float] | None


def _axis_spacing(spacing: Spacing, ndim: int) -> np.ndarray:
    """Per-axis pixel size: a scalar (isotropic) or one value per axis; ``None`` -> 1 (pixels)."""
    if spacing is None:
        return np.ones(ndim)
    step = np.atleast_1d(np.asarray(spacing, dtype=float))
    if step.size == 1:
        return np.full(ndim, float(step[0]))
    if step.size != ndim:
        raise ValueError(f"spacing {tuple(step.tolist())} has {step.size} values for {ndim}-D masks")
    return step


def hausdorff_percentile(
    pred: np.ndarray,
    ref: np.ndarray,
    percentile: float = 95.0,
    spacing: Spacing = None,
) -> float:
    """Symmetric percentile Hausdorff distance between the boundaries of two binary masks (HD95 by default).

    The MONAI definition (``monai.metrics.compute_hausdorff_distance(percentile=..., spacing=...)``, which
    MIRAGE's evaluation calls; tests/test_metrics.py checks the two agree): boundary pixels are the mask
    pixels with a 4-neighbour outside it (``scipy`` binary erosion); distances from every boundary pixel
    of one mask to the nearest boundary pixel of the other, the ``percentile``-th value taken in each
    direction and the larger of the two returned (``percentile=100``: the Hausdorff distance). Distances
    are in pixels, or in the units of ``spacing`` (one value, or one per axis, e.g. ``(axial, lateral)``).
    Kept here rather than calling MONAI so that octlightning does not depend on it at run time.

    Empty masks: both empty -> NaN (nothing to measure); one empty -> ``inf`` (callers substitute their
    convention, see :func:`hd95_per_class`).
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    step = _axis_spacing(spacing, pred.ndim)
    has_pred, has_ref = pred.any(), ref.any()
    if not has_pred and not has_ref:
        return float("nan")
    if not has_pred or not has_ref:
        return float("inf")
    # Both boundaries lie inside the bounding box of the union: distances computed inside it are exact,
    # and much cheaper than on the whole B-scan. One pixel of margin keeps the image border behaviour.
    union = pred | ref
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(union))
    pred_edge, ref_edge = _surface(pred)[box], _surface(ref)[box]
    to_ref = ndimage.distance_transform_edt(~ref_edge, sampling=step)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=step)[ref_edge]
    return float(max(np.percentile(to_ref, percentile), np.percentile(to_pred, percentile)))


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def hd95_per_class(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    num_classes: int,
    valid: np.ndarray | Tensor | None = None,
    spacing: Spacing = None,
) -> np.ndarray:
    """HD95 of every foreground class ``1..K-1`` between two ``(H, W)`` label maps: ``(K-1,)`` float64.

    Pixels outside ``valid`` (unannotated, padding) belong to no class. ``spacing`` is the pixel size, one
    value or ``(row, column)``; the result is in its units (pixels without it). A class absent from both
    the prediction and the reference is NaN (see the module's conventions); a class present in only one
    of them scores the image diagonal in the same units (MIRAGE's value), so means stay finite.
    """
    pred, target = _as_numpy(pred), _as_numpy(target)
    inside = np.ones(pred.shape, dtype=bool) if valid is None else _as_numpy(valid).astype(bool)
    step = _axis_spacing(spacing, pred.ndim)
    diagonal = float(np.sqrt(np.sum((np.asarray(pred.shape) * step) ** 2)))
    out = np.empty(num_classes - 1)
    for k in range(1, num_classes):
        d = hausdorff_percentile((pred == k) & inside, (target == k) & inside, 95.0, step)
        out[k - 1] = diagonal if np.isinf(d) else d
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def score_row(
    counts: Tensor | None,
    class_names: Sequence[str] | None = None,
    hd95: Sequence[float] | None = None,
    hd95_unit: str = "px",
) -> dict[str, float]:
    """One result-table row from ``(K, 4)`` confusion counts: mean foreground scores, then per class.

    Means skip NaN classes (absent from reference and prediction; NaN when all are). ``class_names``
    (one per foreground class) adds ``<score>_<class>`` columns; without them (binary problems) the row
    holds the means only. ``hd95`` (one value per foreground class) adds the ``hd95_<unit>`` columns
    (:func:`hd95_column`); ``counts=None`` gives the HD95 columns alone.
    """
    row: dict[str, float] = {}
    per_class_columns = class_names is not None
    scores: dict[str, list[float]] = {}
    if counts is not None:
        scores = {name: [float(v) for v in per_class[1:]] for name, per_class in scores_from_counts(counts).items()}
    if hd95 is not None:
        scores[hd95_column(hd95_unit)] = [float(v) for v in hd95]
    for name, fg in scores.items():
        row[name] = _nanmean(fg)
        if per_class_columns:
            row.update({f"{name}_{c}": v for c, v in zip(class_names, fg, strict=True)})
    return row


def mean_row(rows: Sequence[dict[str, Any]], key: str, label: str = "mean") -> dict[str, Any]:
    """Summary row: the mean of every numeric column over ``rows`` (NaN skipped), ``key`` set to ``label``."""
    columns = [c for c in dict.fromkeys(c for r in rows for c in r) if c != key]
    out: dict[str, Any] = {key: label}
    for c in columns:
        values = [r[c] for r in rows if isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool)]
        if values:
            out[c] = _nanmean([float(v) for v in values])
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


def score_volumes(
    slices: Sequence[SliceCounts], class_names: Sequence[str] | None = None, hd95_unit: str = "px"
) -> list[dict[str, Any]]:
    """Per-volume result rows, sorted by volume id, from the B-scans of each volume.

    A volume's Dice, IoU, sensitivity, specificity and accuracy come from the summed confusion counts
    of its B-scans (pixel-wise over the whole volume, as RETOUCH and MIRAGE score volumes; a class absent
    from the whole volume's reference and prediction is NaN); its HD95 (in ``hd95_unit``) is the mean
    over the B-scans where the class is present in the reference or the prediction. When every B-scan
    of a volume has ``voxel_mm3``, each class also gets the reference and predicted volume and their
    absolute difference in mm^3 (``ref_mm3_<class>``, ``pred_mm3_<class>``, ``avd_mm3_<class>``: the
    RETOUCH challenge's absolute volume difference). Columns: ``volume``, ``slices``, then the columns
    of :func:`score_row` (per class with ``class_names``, one per foreground class; without them, for
    binary problems, the means only and volumes under the name ``foreground``). The one implementation
    used by the test step (``test_volumes.csv``) and ``octlightning evaluate``; the caller adds a
    ``mean`` row (:func:`mean_row`).

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
            per_slice = np.array([s.hd95 for s in part], dtype=float)
            means = [_nanmean(per_slice[:, c].tolist()) for c in range(per_slice.shape[1])]
            row.update(score_row(None, class_names, means, hd95_unit))
        rows.append(row)
    return rows


def mirage_volume_scores(
    pred: np.ndarray, ref: np.ndarray, class_value: int, invalid_values: Sequence[int] = ()
) -> dict[str, float]:
    """One (volume, class) row of MIRAGE's published protocol (``run_seg_eval.py``), reproduced exactly.

    ``pred``/``ref`` are ``(S, H, W)`` INFO.json intensity volumes (B-scans in slice order). As MIRAGE
    does: reference pixels with an ``invalid`` value are given that value in the prediction too (so they
    count for no class); ``Dice = 2|P∩R| / (|P| + |R| + 1e-6)`` and ``IoU = |P∩R| / (|P∪R| + 1e-6)`` over
    the whole volume (a class absent from both scores 0); ``HD95`` is the mean over B-scans of the
    per-B-scan value in pixels: 0 when the class mask of both is constant (MIRAGE tests ``np.unique`` of
    the 0/1 mask, so a class covering a whole B-scan counts as "empty" too), the B-scan diagonal when one
    of them is, else MONAI's 95th-percentile Hausdorff distance (:func:`hausdorff_percentile`).
    """
    pred = np.array(pred, copy=True)
    for v in invalid_values:
        pred[ref == v] = v
    p, r = pred == class_value, ref == class_value
    inter = float(np.sum(p & r))
    dice = 2.0 * inter / (float(p.sum()) + float(r.sum()) + 1e-6)
    iou = inter / (float(p.sum()) + float(r.sum()) - inter + 1e-6)
    hd = []
    for ps, rs in zip(p, r, strict=True):
        constant_p, constant_r = np.unique(ps).size == 1, np.unique(rs).size == 1
        if constant_p and constant_r:
            hd.append(0.0)
        elif constant_p or constant_r:
            hd.append(float(np.sqrt(rs.shape[0] ** 2 + rs.shape[1] ** 2)))
        else:
            hd.append(hausdorff_percentile(ps, rs, 95.0))
    return {"Dice": dice, "IoU": iou, "HD95": float(np.mean(hd))}


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


def boundary_errors_by_subject(rows: Sequence[dict[str, Any]], boundary_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-subject boundary errors pooled from the per-B-scan rows of a layer-regression test.

    Each row carries ``subject``, ``mae_px_<name>`` and ``columns_<name>`` (the B-scan's mean absolute
    error over its annotated A-scans, and their count) per boundary, optionally ``mae_um_<name>``,
    ``thickness_mae_px``/``_um`` with ``_thickness_columns``. A subject's error per boundary is the mean
    over all its annotated A-scans (each B-scan weighted by its column count), as ``BoundaryError``
    computes over a split; ``mae_px``/``mae_um`` are the mean over boundaries. Returns one row per
    subject, in subject order (numeric where they are numbers): ``subject``, ``bscans``, the pooled
    values, ``columns_<name>``. Values without any annotated column are NaN. Rows without a ``subject``
    are left out (none: ``[]``).
    """
    by_subject: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("subject") is not None:
            by_subject.setdefault(row["subject"], []).append(row)

    def pooled(members: list[dict[str, Any]], value: str, count: str) -> tuple[float, int]:
        pairs = [(float(r[value]), int(r[count])) for r in members if value in r and int(r.get(count, 0)) > 0]
        n = sum(c for _, c in pairs)
        return (sum(v * c for v, c in pairs) / n if n else float("nan")), n

    def numeric_first(subject: Any) -> tuple[int, float, str]:  # subjects "2" before "10"
        try:
            return 0, float(subject), ""
        except (TypeError, ValueError):
            return 1, 0.0, str(subject)

    out = []
    for subject in sorted(by_subject, key=numeric_first):
        members = by_subject[subject]
        row: dict[str, Any] = {"subject": subject, "bscans": len(members)}
        columns = {}
        for unit in ("px", "um"):
            if not any(f"mae_{unit}_{boundary_names[0]}" in r for r in members):
                continue
            per = {}
            for name in boundary_names:
                per[name], columns[name] = pooled(members, f"mae_{unit}_{name}", f"columns_{name}")
            finite = [v for v in per.values() if math.isfinite(v)]
            row[f"mae_{unit}"] = sum(finite) / len(finite) if finite else float("nan")
            row.update({f"mae_{unit}_{name}": v for name, v in per.items()})
            if any("_thickness_columns" in r for r in members):
                row[f"thickness_mae_{unit}"], _ = pooled(members, f"thickness_mae_{unit}", "_thickness_columns")
        row.update({f"columns_{name}": n for name, n in columns.items()})
        out.append(row)
    return out


ISIC_JACCARD_THRESHOLD = 0.65


def thresholded_jaccard(
    iou: Tensor | np.ndarray | Sequence[float] | float, threshold: float = ISIC_JACCARD_THRESHOLD
) -> Tensor:
    """The ISIC 2018 Task 1 score of each image: its Jaccard index, or 0 where that is below ``threshold``.

    The challenge ranks by the mean of these values, which penalises images where the segmentation
    fails (Jaccard < 0.65) as total failures instead of partial successes. The comparison happens in the
    input's own floating-point precision, so that a float32 (or float16) Jaccard of exactly 0.65 is kept
    as the float64 one is. NaN (no lesion in reference or prediction) stays NaN. Returns float64 values
    of the same shape as ``iou``.
    """
    values = torch.as_tensor(iou if isinstance(iou, Tensor | np.ndarray) else np.asarray(iou, dtype=np.float64))
    if not values.is_floating_point():
        values = values.double()
    below = values < torch.tensor(threshold, dtype=values.dtype)
    values = values.double()
    return torch.where(below, torch.zeros_like(values), values)
