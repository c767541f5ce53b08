"""Coordinate helpers for per-column boundary rows (OCT layer regression): resizing and resampling.

Coordinates follow the pixel-centre convention of image resizing (row/column ``i`` is the centre of
pixel ``i``): resizing ``n`` to ``m`` pixels maps ``x`` to ``(x + 0.5) * m / n - 0.5``, the mapping
``cv2.resize`` and ``F.interpolate(align_corners=False)`` apply to the image, so an image and the
boundary rows drawn on it stay registered through any resize. Used by the layer DataModule (targets)
and the layer-regression task (predictions back to the original B-scan).
"""

from __future__ import annotations

import numpy as np
import torch


def rescale_rows(y: np.ndarray | torch.Tensor, src: int, dst: int):
    """Map row coordinates from an image of height ``src`` to one of height ``dst`` (pixel centres)."""
    return (y + 0.5) * (dst / src) - 0.5


def column_positions(src: int, dst: int) -> np.ndarray:
    """Where the ``dst`` resampled columns' centres lie on the ``src`` column grid."""
    return (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5


def resample_columns(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample per-column values ``(..., W)`` to ``width`` columns by linear interpolation.

    Uses the resize convention of the image, so the values stay registered with a resized image;
    positions beyond the outer column centres take the border column. A resampled column is valid
    (second output) only when every source column it interpolates between is finite: NaN never
    leaks into a value, and gaps are not bridged here (see :func:`interpolate_gaps`).
    """
    values = np.asarray(values, dtype=np.float64)
    src = values.shape[-1]
    pos = np.clip(column_positions(src, width), 0, src - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    a, b = values[..., lo], values[..., hi]
    valid = np.isfinite(a) & (np.isfinite(b) | (frac == 0))
    out = a + frac * (np.where(np.isfinite(b), b, a) - a)
    return np.where(valid, out, np.nan), valid


def interpolate_gaps(values: np.ndarray) -> np.ndarray:
    """Fill NaN runs *between* annotated columns by linear interpolation, per row of ``(..., W)``.

    Columns before the first or after the last annotated column stay NaN: extrapolating a boundary
    beyond the annotation would invent data.
    """
    out = np.array(values, dtype=np.float64, copy=True)
    flat = out.reshape(-1, out.shape[-1])
    cols = np.arange(flat.shape[-1])
    for row in flat:
        ok = np.isfinite(row)
        if ok.sum() < 2:
            continue
        first, last = np.flatnonzero(ok)[[0, -1]]
        inner = ~ok & (cols > first) & (cols < last)
        row[inner] = np.interp(cols[inner], cols[ok], row[ok])
    return out
