"""Overlay images: an image with reference and predicted masks, for loggers and prediction folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor

# Class colours (RGB): class 1 red, 2 green, 3 blue, then more distinct hues.
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
    ],
    dtype=np.uint8,
)


def to_display(image: Tensor) -> np.ndarray:
    """A normalised ``(C, H, W)`` tensor -> ``(H, W, 3)`` uint8, min-max scaled for viewing."""
    x = image.detach().float().cpu()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    lo, hi = x.amin(), x.amax()
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=1)


def overlay(
    image: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None, alpha: float = 0.4
) -> np.ndarray:
    """Tint predicted labels over the image; draw the reference as white contours when given."""
    out = image.astype(np.float32).copy()
    labels = np.asarray(labels)
    for k in np.unique(labels):
        if k == 0:
            continue
        sel = labels == k
        out[sel] = (1 - alpha) * out[sel] + alpha * PALETTE[int(k) % len(PALETTE)]
    if reference is not None:
        for k in np.unique(reference):
            if k == 0:
                continue
            out[_boundary(np.asarray(reference) == k)] = 255
    return out.clip(0, 255).astype(np.uint8)


def save_png(array: np.ndarray | Tensor, path: Path) -> None:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
