"""Fundus vessel segmentation sets: DRIVE (as published), CHASE_DB1, Kaggle, or plain image/mask folders.

Which files each layout holds is :mod:`octlightning.data.formats.fundus`; this module decodes them and
serves samples.

Every sample carries its field-of-view (FOV) mask so that losses and metrics only count pixels inside
the retina, as the DRIVE protocol prescribes. The sets are small (20-40 images), so every image is
decoded once in :meth:`setup` and kept in memory; loader workers share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from scipy import ndimage
from torch.utils.data import Dataset

from octlightning.data.base import BaseDataModule, make_pad_collate, split_indices
from octlightning.data.formats.fundus import (
    LAYOUT_MASK_THRESHOLD,
    LAYOUTS,
    Layout,
    chase_child,
    detect_layout,
    labelled_fundus_files,
    scan_fundus_files,
)
from octlightning.data.io import (
    list_images,
    read_image,
    read_mask,
    require_dir,
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


@dataclass
class FundusRecord:
    """One decoded image with its vessel mask (``None`` when unknown) and FOV mask, uint8 arrays.

    ``group`` is what must not be split apart (CHASE_DB1: the child, both eyes; else the image).
    """

    id: str
    image: np.ndarray
    vessels: np.ndarray | None
    fov: np.ndarray
    image_path: Path
    group: str = ""


def fov_from_image(image: np.ndarray, threshold: int = 20) -> np.ndarray:
    """FOV for sets that ship none (CHASE_DB1, Kaggle): red channel above a dark threshold, holes filled."""
    fov = ndimage.binary_fill_holes(image[..., 0] > threshold)
    return ndimage.binary_opening(fov, iterations=2).astype(np.uint8)


def load_fundus_records(files, clahe: bool, mask_threshold: int | None = None, layout: str = "") -> list[FundusRecord]:
    """Decode ``(id, image, vessel mask, fov)`` paths: RGB uint8 image, {0, 1} masks (strictly
    two-valued, or ``> mask_threshold``), FOV from the file or, without one, from the image."""
    records = []
    for key, image_path, mask_path, fov_path in files:
        image = read_image(image_path, "RGB")
        if clahe:
            image = clahe_green(image)
        vessels = read_mask(mask_path, mask_threshold) if mask_path is not None else None
        fov = read_mask(fov_path, mask_threshold) if fov_path is not None else fov_from_image(image)
        for name, arr, path in (("vessel mask", vessels, mask_path), ("FOV mask", fov, fov_path)):
            if arr is not None and arr.shape != image.shape[:2]:
                raise DataError(
                    f"{path}: {name} is {arr.shape[1]}x{arr.shape[0]} but its image {image_path} is "
                    f"{image.shape[1]}x{image.shape[0]} (W x H); they must match"
                )
        group = chase_child(image_path) if layout == "chase" else key
        records.append(FundusRecord(key, image, vessels, fov, image_path, group))
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

    def describe(self) -> str | None:
        """What one epoch's samples are when there are more than images (``check-data`` prints it)."""
        if self.patches_per_image == 1:
            return None
        return f"{self.patches_per_image} random crops from each of {len(self.records)} images, drawn every epoch"

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
        root: dataset folder (DRIVE: the folder holding ``training/`` and ``test/``; Kaggle: the folder
            holding ``Data/``, or ``Data/`` itself; CHASE_DB1: the folder of ``Image_*`` files).
        batch_size, eval_batch_size, num_workers, seed, val_fraction, predict_dir: see
            :class:`~octlightning.data.base.BaseDataModule`.
        test_fraction: must stay 0: every fundus layout brings its own test split.
        num_folds: must stay 0 (every fundus layout brings its own test split, so there is nothing to cross-validate).
        fold: not used (``num_folds`` is 0).
        in_channels: 3 (RGB) or 1 (the green channel alone, the best vessel contrast).
        cache_mb: not used: fundus sets (20-100 images) are decoded once in ``setup`` and kept whole.
        test_dir: another fundus dataset (any layout, always detected) whose every annotated image ``test``
            scores (its training and test parts); ``None`` tests ``root``'s test split.
        layout: ``None`` (default) recognises the layout by its folder and file names and says which
            it found; or ``drive`` (published DRIVE layout), ``chase`` (CHASE_DB1 flat folder,
            ``Image_NNL.jpg`` + ``Image_NNL_1stHO.png``; children 1-10 train, 11-14 test), ``kaggle``
            (Kaggle retina-blood-vessel: ``Data/{train,test}/{image,mask}/N.png``) or ``folder``
            (``images/`` + ``masks/`` [+ ``fov/``], test set under ``test/``). Layouts without FOV masks
            (CHASE_DB1, Kaggle, folders without ``fov/``) get the FOV from the image
            (:func:`fov_from_image`).
        mask_threshold: ``None`` uses the layout's default: grey levels above 127 are vessel for the
            Kaggle set (its masks have interpolated grey edges), strictly two-valued masks for the
            others. A number binarises every mask (and FOV mask) as ``grey level > mask_threshold``.
        patch_size: train on random ``patch_size x patch_size`` crops; ``None`` trains on whole images.
        patches_per_image: crops drawn from each training image per epoch (patch training).
        clahe: equalise the green channel (CLAHE) before everything else.
        augment: flips, rotation, elastic deformation and brightness/contrast during training.
        pad_to: evaluation images are padded to a multiple of this (the network's stride).

    Validation is a seeded ``val_fraction`` of the training images, by child for CHASE_DB1 (both eyes
    of one child in one split), by image otherwise.
    """

    channel_choices = {3: "RGB", 1: "the green channel alone"}
    own_splits = {"test": "the layout's own test images"}

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
        test_dir: str | None = None,
        num_folds: int = 0,
        fold: int = 0,
        layout: Layout | None = None,
        mask_threshold: int | None = None,
        patch_size: int | None = None,
        patches_per_image: int = 1,
        clahe: bool = False,
        augment: bool = True,
        pad_to: int = 32,
    ) -> None:
        super().__init__(
            root, batch_size, eval_batch_size, num_workers, seed, val_fraction, test_fraction, predict_dir,
            in_channels, cache_mb, test_dir, num_folds=num_folds, fold=fold,
        )  # fmt: skip
        self.save_hyperparameters()
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"unknown fundus layout {layout!r}; choose one of {list(LAYOUTS)} or null (detect)")
        self.layout = layout
        self.mask_threshold = mask_threshold
        self.patch_size = [patch_size, patch_size] if patch_size else None
        self.patches_per_image = patches_per_image if patch_size else 1
        self.channels = "green" if in_channels == 1 else "rgb"
        self.clahe = clahe
        self.augment = augment
        self.pad_to = pad_to
        self._train_records: list[FundusRecord] | None = None
        self._detected: dict[Path, Layout] = {}  # said once per folder

    num_classes = 1  # binary: one vessel logit
    class_names = ["vessel"]

    def resolve_layout(self, root: Path) -> Layout:
        """``layout`` when given, else the one :func:`detect_layout` finds (said in one log line)."""
        if self.layout is not None:
            return self.layout
        return self._detect(root)

    def _detect(self, root: Path) -> Layout:
        if root not in self._detected:
            self._detected[root] = found = detect_layout(root)
            rank_zero_info(f"FundusVesselDataModule: {root} has the {found} layout (detected; set layout to override)")
        return self._detected[root]

    def _records(self, layout: Layout, files) -> list[FundusRecord]:
        threshold = self.mask_threshold if self.mask_threshold is not None else LAYOUT_MASK_THRESHOLD.get(layout)
        return load_fundus_records(files, self.clahe, threshold, layout)

    def _training_records(self) -> list[FundusRecord]:
        if self._train_records is None:
            root = Path(self.root)
            layout = self.resolve_layout(root)
            self._train_records = self._records(layout, scan_fundus_files(root, layout, "train"))
        return self._train_records

    def setup(self, stage: str) -> None:
        self.require_sources(stage)
        if stage in ("fit", "validate"):
            records = self._training_records()
            groups = [r.group for r in records]
            if len(set(groups)) < 2:
                raise DataError(f"{self.root}: need at least 2 training images (children) for a validation split")
            train_idx, val_idx = split_indices(groups, [self.val_fraction], self.seed)
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
            if self.test_dir is not None:
                root = Path(self.test_dir)
                layout = self._detect(root)  # ``layout`` names root's layout; a held-out set may have another
                files = labelled_fundus_files(root, layout)
                rank_zero_info(f"FundusVesselDataModule: testing on all {len(files)} annotated images of {root}")
            else:
                root = Path(self.root)
                layout = self.resolve_layout(root)
                files = scan_fundus_files(root, layout, "test")
            records = self._records(layout, files)
            missing = [r.image_path for r in records if r.vessels is None]
            if missing:
                raise DataError(f"test images without vessel masks, cannot score them: {missing[:5]}")
            if not records:
                raise DataError(f"{root}: no annotated images to test on")
            self.test_set = FundusDataset(records, None, self.channels)
        if stage == "predict":
            if self.predict_dir is not None:
                paths = list_images(require_dir(Path(self.predict_dir), "predict"))
                if not paths:
                    raise DataError(f"{self.predict_dir}: no images to predict")
                files = [(k, p, None, None) for k, p in unique_index(paths, what="image to predict").items()]
                layout = "folder"
            else:
                root = Path(self.root)
                layout = self.resolve_layout(root)
                files = [(k, img, None, fov) for k, img, _, fov in scan_fundus_files(root, layout, "test")]
            self.predict_set = FundusDataset(self._records(layout, files), None, self.channels)

    def collate_fn(self, train: bool):
        return make_pad_collate(self.pad_to, ("image", "mask", "fov"))
