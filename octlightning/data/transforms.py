"""Augmentation shared by the DataModules (albumentations pipelines for images and masks, the
boundary-preserving B-scan augmentation of the layer recipe), and image/mask tensor conversion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import albumentations as A
import cv2
import numpy as np
import torch

from octlightning.data.coords import column_positions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Reseedable(Protocol):
    """A transform with its own random generator: an ``A.Compose`` or :class:`LayerAugmentation`."""

    def set_random_seed(self, seed: int) -> None: ...

    def __call__(self, **data: Any) -> dict[str, Any]: ...


class SeededTransform:
    """A transform (``A.Compose``, :class:`LayerAugmentation`) reseeded from ``torch.initial_seed()`` in
    every loader worker.

    Albumentations 2 keeps its own random generators, which a forked worker copies: without this
    every worker would produce the same augmentations, and runs would not follow the global seed.
    ``torch.initial_seed()`` differs per worker and follows ``seed_everything``.
    """

    def __init__(self, compose: Reseedable) -> None:
        self.compose = compose
        self._seed: int | None = None

    def __call__(self, **data: Any) -> dict[str, Any]:
        seed = torch.initial_seed() % 2**32
        if seed != self._seed:
            self.compose.set_random_seed(seed)
            self._seed = seed
        return self.compose(**data)


def photometric_ops(
    brightness_contrast: float, noise: float, noise_std: tuple[float, float], speckle: float = 0.0
) -> list[A.BasicTransform]:
    """Intensity changes that move no pixel, each applied with its probability (0 leaves it out).

    Args:
        brightness_contrast: probability of a random brightness/contrast change (+-20 %).
        noise: probability of additive Gaussian noise.
        noise_std: its standard deviation range, as a fraction of the intensity range.
        speckle: probability of multiplicative, per-pixel noise (factor in 0.8-1.2), like OCT speckle.
    """
    ops: list[A.BasicTransform] = []
    if brightness_contrast > 0:
        ops.append(A.RandomBrightnessContrast(0.2, 0.2, p=brightness_contrast))
    if speckle > 0:
        ops.append(A.MultiplicativeNoise(multiplier=(0.8, 1.2), elementwise=True, p=speckle))
    if noise > 0:
        ops.append(A.GaussNoise(std_range=noise_std, p=noise))
    return ops


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
    ops += photometric_ops(brightness_contrast, noise, noise_std=(0.02, 0.06))
    return SeededTransform(A.Compose(ops, additional_targets={k: "mask" for k in extra_masks}))


class LayerAugmentation:
    """Augmentation for a B-scan and its boundary coordinates that keeps both registered.

    Geometric: horizontal flip (columns reversed), vertical scaling about the image centre and
    vertical shift, and an "elastic" smooth column-wise vertical displacement; all move rows only, so
    the same transform maps every coordinate exactly (one ``cv2.remap`` for the image). Photometric
    (albumentations): brightness/contrast, multiplicative speckle-like noise, additive Gaussian noise.
    Boundaries pushed out of the image are marked invalid. Implements ``set_random_seed`` so that
    :class:`SeededTransform` reseeds it per loader worker.

    Where the retina sits in a B-scan differs between scans and devices far more than within one
    subject's volume (Duke DME: mean ILM row 94 to 193 of 496 between subjects), so the shift is large
    by default; a network that has seen only its training subjects' positions misplaces boundaries on
    an unseen subject's. The shift is drawn within what keeps every annotated boundary inside the image
    and the rows it exposes free of them (at most the distance from the top boundary to the top edge
    and from the bottom boundary to the bottom edge), and exposed rows mirror the image's own border
    rows (vitreous above, choroid below) rather than a constant: a black band would be a dark-to-bright
    edge the network learns to ignore only at training positions and mistakes for the ILM elsewhere.

    Args:
        hflip: probability of a horizontal flip.
        shift: maximal vertical shift as a fraction of the height (uniform in +-shift, narrowed per
            sample as above).
        scale: maximal vertical scaling (factor uniform in ``1 +- scale``).
        elastic: probability of a smooth column-wise vertical displacement.
        elastic_amplitude: its maximal displacement as a fraction of the height.
        brightness_contrast, speckle, noise: probabilities of the photometric transforms.
    """

    def __init__(
        self,
        hflip: float = 0.5,
        shift: float = 0.15,
        scale: float = 0.1,
        elastic: float = 0.0,
        elastic_amplitude: float = 0.03,
        brightness_contrast: float = 0.5,
        speckle: float = 0.3,
        noise: float = 0.2,
    ) -> None:
        self.hflip, self.shift, self.scale = hflip, shift, scale
        self.elastic, self.elastic_amplitude = elastic, elastic_amplitude
        ops = photometric_ops(brightness_contrast, noise, noise_std=(0.01, 0.05), speckle=speckle)
        self.photometric = A.Compose(ops) if ops else None
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        if self.photometric is not None:
            self.photometric.set_random_seed(seed)

    def _column_displacement(self, width: int, height: int) -> np.ndarray:
        """A smooth random vertical displacement per column (a few random sine components)."""
        x = np.arange(width) / max(1, width - 1)
        d = np.zeros(width)
        for k in range(1, 4):
            d += self.rng.normal() / k * np.sin(np.pi * k * x + self.rng.uniform(0, 2 * np.pi))
        return d / max(1e-6, np.abs(d).max()) * self.elastic_amplitude * height * self.rng.uniform()

    def _shift_room(self, rows: np.ndarray, height: int) -> float:
        """The largest shift (rows, either way) that keeps ``rows`` (annotated boundary rows after
        scaling) inside the image and out of the mirrored band it exposes; ``shift * height`` at most."""
        if rows.size == 0:
            return self.shift * height
        return float(np.clip(min(rows.min(), height - 1 - rows.max()), 0, self.shift * height))

    def __call__(self, image: np.ndarray, coords: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        """``image`` ``(H, W)`` float32, ``coords``/``valid`` ``(L, W_out)`` in the image's pixels."""
        h, w = image.shape
        rng = self.rng
        s = 1 + rng.uniform(-self.scale, self.scale) if self.scale > 0 else 1.0
        c = (h - 1) / 2
        t = rng.uniform(-1, 1) * self._shift_room(s * (coords[valid] - c) + c, h) if self.shift > 0 else 0.0
        d = self._column_displacement(w, h) if self.elastic > 0 and rng.random() < self.elastic else np.zeros(w)
        if s != 1.0 or t != 0.0 or d.any():
            # destination row y' = s * (y - c) + c + t + d(x)  <=>  source row y = (y' - c - t - d(x)) / s + c
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            map_y = ((yy - c - t - d[None, :]) / s + c).astype(np.float32)
            image = cv2.remap(image, xx, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
            d_out = np.interp(np.clip(column_positions(w, coords.shape[-1]), 0, w - 1), np.arange(w), d)
            coords = s * (coords - c) + c + t + d_out[None, :]
            valid = valid & (coords >= 0) & (coords <= h - 1)
            coords = np.where(valid, coords, np.nan)
        if self.hflip > 0 and rng.random() < self.hflip:
            image, coords, valid = image[:, ::-1], coords[:, ::-1], valid[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(image=np.ascontiguousarray(image))["image"]
        return {"image": np.ascontiguousarray(image), "coords": np.ascontiguousarray(coords), "valid": valid.copy()}


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
