"""Tiled (sliding-window) inference with overlap blending.

Networks trained on patches (the RETOUCH recipe trains on 256 x 128 B-scan patches) predict whole
images tile by tile; overlapping tiles are averaged with a weight that falls off towards the tile
border, where the network saw the least context, so that no seams appear between tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Blend = Literal["gaussian", "linear", "constant"]


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``: evenly spread, the last one flush with the end.

    Neighbouring tiles overlap by at least ``overlap`` (a fraction of ``tile``).
    """
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def blend_weights(size: Sequence[int], blend: Blend = "gaussian", sigma_scale: float = 0.125) -> Tensor:
    """``(h, w)`` weight map of one tile, maximal (1) in the centre.

    ``gaussian``: exp(-d^2 / 2 sigma^2) with sigma = ``sigma_scale`` x tile size per axis (nnU-Net's
    choice); ``linear``: a pyramid falling to 1 / (half size) at the border; ``constant``: plain mean.
    Weights are kept above zero so that pixels near the image border, covered only by tile borders,
    still get a prediction.
    """
    axes = []
    for n in size:
        pos = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        if blend == "gaussian":
            axes.append(torch.exp(-(pos**2) / (2 * (sigma_scale * n) ** 2)))
        elif blend == "linear":
            half = n / 2
            axes.append((half - pos.abs()) / half)
        elif blend == "constant":
            axes.append(torch.ones(n))
        else:
            raise ValueError(f"unknown blend {blend!r}; choose gaussian, linear or constant")
    weights = axes[0][:, None] * axes[1][None, :]
    return weights.clamp_min(1e-3 * float(weights.max()))


@torch.no_grad()
def sliding_window(
    net_fn: Callable[[Tensor], Tensor],
    image: Tensor,
    patch: Sequence[int],
    overlap: float = 0.5,
    blend: Blend = "gaussian",
    tile_batch: int = 16,
) -> Tensor:
    """Apply ``net_fn`` to overlapping ``patch``-sized tiles of ``image`` and blend the outputs.

    Args:
        net_fn: maps ``(N, C, ph, pw)`` to ``(N, K, ph, pw)`` (logits or probabilities; what it returns
            is averaged).
        image: ``(B, C, H, W)``; any size: images smaller than the patch are zero-padded for the network
            and cropped back.
        patch: tile ``(height, width)``.
        overlap: fraction of the tile shared by neighbouring tiles, in ``[0, 1)``.
        blend: tile weighting, see :func:`blend_weights`.
        tile_batch: tiles per network call (bounds the memory).

    Returns:
        ``(B, K, H, W)`` float32, exactly the spatial size of ``image``.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    ph, pw = (int(v) for v in patch)
    b, _, h, w = image.shape
    # Pad small images up to one tile; the padding is cropped from the result.
    padded = F.pad(image, (0, max(0, pw - w), 0, max(0, ph - h)))
    hp, wp = padded.shape[-2:]
    weights = blend_weights((ph, pw), blend).to(image.device)
    boxes = [(y, x) for y in tile_starts(hp, ph, overlap) for x in tile_starts(wp, pw, overlap)]
    # Every (image, tile) pair, run in chunks of `tile_batch`.
    jobs = [(i, y, x) for i in range(b) for y, x in boxes]
    out: Tensor | None = None
    norm = torch.zeros(1, 1, hp, wp, device=image.device)
    for y, x in boxes:
        norm[..., y : y + ph, x : x + pw] += weights
    for start in range(0, len(jobs), tile_batch):
        chunk = jobs[start : start + tile_batch]
        tiles = torch.stack([padded[i, :, y : y + ph, x : x + pw] for i, y, x in chunk])
        pred = net_fn(tiles).float()
        if pred.shape[-2:] != (ph, pw):
            raise ValueError(f"net_fn returned tiles of {tuple(pred.shape[-2:])}, expected {(ph, pw)}")
        if out is None:
            out = torch.zeros(b, pred.shape[1], hp, wp, device=image.device)
        for (i, y, x), p in zip(chunk, pred, strict=True):
            out[i, :, y : y + ph, x : x + pw] += p * weights
    assert out is not None
    return (out / norm)[..., :h, :w]
