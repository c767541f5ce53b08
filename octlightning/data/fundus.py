"""Fundus vessel segmentation sets: DRIVE (as published), CHASE_DB1, or plain image/mask folders.

Every sample carries its field-of-view (FOV) mask so that losses and metrics only count pixels inside
the retina, as the DRIVE protocol prescribes. The sets are small (20-40 images), so every image is
decoded once in :meth:`setup` and kept in memory; loader workers share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from octlightning.data.base import BaseDataModule, make_pad_collate, split_indices
from octlightning.data.io import (
    check_pairs,
    list_images,
    read_binary_mask,
    read_image,
    require_dir,
    require_utf8_name,
    unique_index,
)
from octlightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SeededTransform,
    clahe_green,
    image_to_tensor,
    mask_to_tensor,
    segmentation_augmentation,
)
from octlightning.errors import DataError

Layout = Literal["drive", "chase", "folder"]


@dataclass
class FundusRecord:
    """One decoded image with its vessel mask (``None`` when unknown) and FOV mask, uint8 arrays."""

    id: str
    image: np.ndarray
    vessels: np.ndarray | None
    fov: np.ndarray
    image_path: Path


def _leading_number(path: Path) -> str:
    m = re.match(r"(\d+)", path.name)
    if not m:
        raise DataError(f"{path}: DRIVE file names start with the image number (e.g. 21_training.tif)")
    return m.group(1)


def fov_from_image(image: np.ndarray, threshold: int = 20) -> np.ndarray:
    """FOV for sets that ship none (CHASE_DB1): red channel above a dark threshold, holes filled."""
    fov = ndimage.binary_fill_holes(image[..., 0] > threshold)
    return ndimage.binary_opening(fov, iterations=2).astype(np.uint8)


def scan_fundus_files(
    root: Path, layout: Layout, split: Literal["train", "test"]
) -> list[tuple[str, Path, Path | None, Path | None]]:
    """Find ``(id, image, vessel mask, fov mask)`` paths for a split; checks that pairs are complete."""
    if layout == "drive":
        folder = require_dir(root / ("training" if split == "train" else "test"), f"DRIVE {split}")
        images = unique_index(list_images(require_dir(folder / "images", "DRIVE images")), _leading_number, "image")
        manual_dir = folder / "1st_manual"
        if manual_dir.is_dir():
            masks = unique_index(list_images(manual_dir), _leading_number, "vessel mask")
            check_pairs(images, masks, "vessel mask (1st_manual/NN_manual1.gif)")
        elif split == "train":
            raise DataError(f"{manual_dir}: DRIVE training folder has no 1st_manual vessel masks")
        else:
            masks = {}
        fov_dir = require_dir(folder / "mask", "DRIVE field-of-view mask")
        fovs = unique_index(list_images(fov_dir), _leading_number, "FOV mask")
        check_pairs(images, fovs, "FOV mask (mask/NN_<split>_mask.gif)")
        return [(k, images[k], masks.get(k), fovs[k]) for k in sorted(images)]
    if layout == "chase":
        require_dir(root, "CHASE_DB1")
        images = unique_index((p for p in list_images(root, (".jpg",)) if p.stem.startswith("Image_")), what="image")
        masks = {p.stem.removesuffix("_1stHO"): require_utf8_name(p) for p in root.glob("Image_*_1stHO.png")}
        if not images:
            raise DataError(f"{root}: no CHASE_DB1 images (Image_NNX.jpg) found")
        check_pairs(images, masks, "1st-observer mask (Image_NNX_1stHO.png)")
        # The usual CHASE_DB1 protocol: children 1-10 (20 images) train, 11-14 (8 images) test.
        keep = [k for k in sorted(images) if (int(k[6:8]) <= 10) == (split == "train")]
        return [(k, images[k], masks[k], None) for k in keep]
    if layout == "folder":
        base = root if split == "train" else root / "test"
        if split == "test" and not base.is_dir():
            raise DataError(f"{base}: no test folder (expected test/images and test/masks)")
        images = unique_index(list_images(require_dir(base / "images", "images")), what="image")
        masks = unique_index(list_images(require_dir(base / "masks", "masks")), what="mask")
        check_pairs(images, masks)
        fovs = {}
        if (base / "fov").is_dir():
            fovs = unique_index(list_images(base / "fov"), what="FOV mask")
            check_pairs(images, fovs, "FOV mask")
        return [(k, images[k], masks[k], fovs.get(k)) for k in sorted(images)]
    raise ValueError(f"unknown fundus layout {layout!r}; choose drive, chase or folder")


def load_fundus_records(files, clahe: bool) -> list[FundusRecord]:
    records = []
    for key, image_path, mask_path, fov_path in files:
        image = read_image(image_path, "RGB")
        if clahe:
            image = clahe_green(image)
        vessels = read_binary_mask(mask_path) if mask_path is not None else None
        fov = read_binary_mask(fov_path) if fov_path is not None else fov_from_image(image)
        for name, arr, path in (("vessel mask", vessels, mask_path), ("FOV mask", fov, fov_path)):
            if arr is not None and arr.shape != image.shape[:2]:
                raise DataError(
                    f"{path}: {name} is {arr.shape[1]}x{arr.shape[0]} but its image {image_path} is "
                    f"{image.shape[1]}x{image.shape[0]} (W x H); they must match"
                )
        records.append(FundusRecord(key, image, vessels, fov, image_path))
    return records


class FundusDataset(Dataset):
    """Decoded fundus images -> dict(image (C,H,W), mask (1,H,W), fov (1,H,W), id, size).

    With ``patches_per_image > 1`` one epoch draws that many random crops from every image.
    """

    def __init__(
        self,
        records: list[FundusRecord],
        transform: SeededTransform | None,
        channels: Literal["rgb", "green"] = "rgb",
        patches_per_image: int = 1,
    ) -> None:
        self.records = records
        self.transform = transform
        self.channels = channels
        self.patches_per_image = patches_per_image

    def __len__(self) -> int:
        return len(self.records) * self.patches_per_image

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index % len(self.records)]
        image, fov = rec.image, rec.fov
        vessels = rec.vessels if rec.vessels is not None else np.zeros_like(fov)
        if self.transform is not None:
            out = self.transform(image=image, mask=vessels, fov=fov)
            image, vessels, fov = out["image"], out["mask"], out["fov"]
        if self.channels == "green":
            tensor = image_to_tensor(image[..., 1], mean=(0.5,), std=(0.25,))
        else:
            tensor = image_to_tensor(image, IMAGENET_MEAN, IMAGENET_STD)
        sample = {
            "image": tensor,
            "fov": mask_to_tensor(fov),
            "id": rec.id,
            "stem": rec.image_path.stem,  # DRIVE's id is the image number: predictions take the file's name
            "size": torch.tensor(image.shape[:2]),
        }
        if rec.vessels is not None:
            sample["mask"] = mask_to_tensor(vessels)
        return sample


class FundusVesselDataModule(BaseDataModule):
    """Fundus vessel segmentation DataModule.

    Args:
        root: dataset folder (DRIVE: the folder holding ``training/`` and ``test/``).
        batch_size, eval_batch_size, num_workers, seed, val_fraction, predict_dir: see
            :class:`~octlightning.data.base.BaseDataModule`.
        test_fraction: must stay 0: every fundus layout brings its own test split.
        in_channels: 3 (RGB) or 1 (the green channel alone, the best vessel contrast).
        cache_mb: not used: fundus sets (20-40 images) are decoded once in ``setup`` and kept whole.
        layout: ``drive`` (published DRIVE layout), ``chase`` (CHASE_DB1 flat folder) or ``folder``
            (``images/`` + ``masks/`` [+ ``fov/``], test set under ``test/``).
        patch_size: train on random ``patch_size x patch_size`` crops; ``None`` trains on whole images.
        patches_per_image: crops drawn from each training image per epoch (patch training).
        clahe: equalise the green channel (CLAHE) before everything else.
        augment: flips, rotation, elastic deformation and brightness/contrast during training.
        pad_to: evaluation images are padded to a multiple of this (the network's stride).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 42,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        predict_dir: str | None = None,
        in_channels: Literal[1, 3] = 3,
        cache_mb: float = 1024,
        layout: Layout = "drive",
        patch_size: int | None = None,
        patches_per_image: int = 1,
        clahe: bool = False,
        augment: bool = True,
        pad_to: int = 32,
    ) -> None:
        super().__init__(
            root, batch_size, eval_batch_size, num_workers, seed, val_fraction, test_fraction, predict_dir,
            in_channels, cache_mb,
        )  # fmt: skip
        self.save_hyperparameters()
        if test_fraction:
            raise ValueError("test_fraction must be 0 for fundus data: every layout brings its own test split")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 3 (RGB) or 1 (green channel), got {in_channels}")
        self.layout = layout
        self.patch_size = [patch_size, patch_size] if patch_size else None
        self.patches_per_image = patches_per_image if patch_size else 1
        self.channels = "green" if in_channels == 1 else "rgb"
        self.clahe = clahe
        self.augment = augment
        self.pad_to = pad_to
        self._train_records: list[FundusRecord] | None = None

    num_classes = 1  # binary: one vessel logit
    class_names = ["vessel"]

    def _training_records(self) -> list[FundusRecord]:
        if self._train_records is None:
            files = scan_fundus_files(Path(self.root), self.layout, "train")
            self._train_records = load_fundus_records(files, self.clahe)
        return self._train_records

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            records = self._training_records()
            if len(records) < 2:
                raise DataError(f"{self.root}: need at least 2 training images for a validation split")
            train_idx, val_idx = split_indices(range(len(records)), [self.val_fraction], self.seed)
            crop = tuple(self.patch_size) if self.patch_size else None
            transform = segmentation_augmentation(
                hflip=0.5 if self.augment else 0,
                vflip=0.5 if self.augment else 0,
                rotate_limit=30 if self.augment else 0,
                elastic=0.2 if self.augment else 0,
                brightness_contrast=0.5 if self.augment else 0,
                crop_size=crop,
                extra_masks=("fov",),
            )
            self.train_set = FundusDataset(
                [records[i] for i in train_idx], transform, self.channels, self.patches_per_image
            )
            self.val_set = FundusDataset([records[i] for i in val_idx], None, self.channels)
        if stage == "test":
            files = scan_fundus_files(Path(self.root), self.layout, "test")
            records = load_fundus_records(files, self.clahe)
            missing = [r.image_path for r in records if r.vessels is None]
            if missing:
                raise DataError(f"test images without vessel masks, cannot score them: {missing[:5]}")
            self.test_set = FundusDataset(records, None, self.channels)
        if stage == "predict":
            if self.predict_dir is not None:
                paths = list_images(require_dir(Path(self.predict_dir), "predict"))
                if not paths:
                    raise DataError(f"{self.predict_dir}: no images to predict")
                files = [(k, p, None, None) for k, p in unique_index(paths, what="image to predict").items()]
            else:
                files = [
                    (k, img, None, fov) for k, img, _, fov in scan_fundus_files(Path(self.root), self.layout, "test")
                ]
            self.predict_set = FundusDataset(load_fundus_records(files, self.clahe), None, self.channels)

    def collate_fn(self, train: bool):
        return make_pad_collate(self.pad_to, ("image", "mask", "fov"))
