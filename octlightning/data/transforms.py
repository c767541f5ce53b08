"""Albumentations pipelines shared by the DataModules, and image/mask tensor conversion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SeededTransform:
    """An ``A.Compose`` that is reseeded from ``torch.initial_seed()`` in every loader worker.

    Albumentations 2 keeps its own random generators, which a forked worker copies: without this
    every worker would produce the same augmentations, and runs would not follow the global seed.
    ``torch.initial_seed()`` differs per worker and follows ``seed_everything``.
    """

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose
        self._seed: int | None = None

    def __call__(self, **data: Any) -> dict[str, Any]:
        seed = torch.initial_seed() % 2**32
        if seed != self._seed:
            self.compose.set_random_seed(seed)
            self._seed = seed
        return self.compose(**data)


def segmentation_augmentation(
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotate_limit: float = 0.0,
    elastic: float = 0.0,
    brightness_contrast: float = 0.0,
    noise: float = 0.0,
    crop_size: Sequence[int] | None = None,
    extra_masks: Sequence[str] = (),
) -> SeededTransform:
    """Geometric + photometric augmentation applied identically to the image and every mask.

    Args:
        hflip, vflip: probabilities of horizontal / vertical flips.
        rotate_limit: maximal rotation in degrees (0 disables), applied with probability 0.5.
        elastic: probability of an elastic deformation.
        brightness_contrast: probability of a random brightness/contrast change (+-20 %).
        noise: probability of additive Gaussian noise.
        crop_size: ``(height, width)`` of a random crop taken first (patch training).
        extra_masks: names of further mask-like targets (e.g. ``"fov"``), nearest-interpolated.
    """
    ops: list[A.BasicTransform] = []
    if crop_size is not None:
        h, w = crop_size
        ops.append(A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0))
        ops.append(A.RandomCrop(height=h, width=w))
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        ops.append(A.VerticalFlip(p=vflip))
    if rotate_limit > 0:
        ops.append(A.Rotate(limit=rotate_limit, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5))
    if elastic > 0:
        ops.append(A.ElasticTransform(alpha=30, sigma=6, p=elastic))
    if brightness_contrast > 0:
        ops.append(A.RandomBrightnessContrast(0.2, 0.2, p=brightness_contrast))
    if noise > 0:
        ops.append(A.GaussNoise(std_range=(0.02, 0.06), p=noise))
    return SeededTransform(A.Compose(ops, additional_targets={k: "mask" for k in extra_masks}))


def clahe_green(image: np.ndarray, clip_limit: float = 2.0, tile: int = 8) -> np.ndarray:
    """Contrast-limited histogram equalisation of the green channel of an RGB uint8 image.

    Vessels have their best contrast in the green channel; equalising only that channel keeps colours
    of the others untouched.
    """
    out = image.copy()
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile, tile))
    out[..., 1] = clahe.apply(np.ascontiguousarray(image[..., 1]))
    return out


def image_to_tensor(
    image: np.ndarray, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> torch.Tensor:
    """uint8 ``(H, W)`` or ``(H, W, C)`` -> float32 ``(C, H, W)`` in [0, 1], optionally standardised."""
    if image.ndim == 2:
        image = image[..., None]
    # A copy, never a view: the array may be a cached (read-only) decoded sample.
    t = torch.tensor(image.transpose(2, 0, 1), dtype=torch.float32).div_(255.0)
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        t = (t - m) / s
    return t


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """``(H, W)`` integer mask -> ``(1, H, W)`` float32 tensor."""
    return torch.tensor(mask, dtype=torch.float32).unsqueeze(0)  # a copy: the array may be cached
