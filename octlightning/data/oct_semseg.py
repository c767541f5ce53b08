"""OCT B-scan semantic segmentation from the MIRAGE benchmark layout: dataset and DataModule.

The layout (``INFO.json``, ``{train,val,test}/{bscan,semseg}/*.png`` or the evaluation-only variant)
is read by :mod:`octlightning.data.formats.mirage`, which documents it. Pixels of an INFO.json
``Invalid`` entry get ``fov = 0`` so that losses and metrics skip them; file names
``<volume>_<slice>.png`` put ``volume`` in every sample, so that the segmentation task also scores
whole volumes. ``python -m octlightning.convert h5-to-mirage <file.h5> <out_dir>`` writes this layout
from the HDF5 layer format (:mod:`octlightning.conversion.h5_to_mirage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from octlightning.data.base import BaseDataModule, SampleCache, cached, make_pad_collate
from octlightning.data.formats.mirage import (
    DEFAULT_IGNORE_LABELS,
    DEFAULT_VOLUME_PATTERN,
    SemSegInfo,
    SemSegItem,
    read_info,
    read_value_mask,
    scan_split,
    split_folder,
)
from octlightning.data.io import list_images, read_image, require_dir, unique_index
from octlightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SeededTransform,
    image_to_tensor,
    mask_to_tensor,
    segmentation_augmentation,
)
from octlightning.errors import ConfigError, DataError


# --------------------------------------------------------------------------- dataset
class OCTSemSegDataset(Dataset):
    """B-scans and class maps -> dict(image (C,H,W), mask (1,H,W), fov (1,H,W), id, size[, volume]).

    Files are decoded when a sample is drawn (the benchmark sets hold thousands of B-scans) and kept in
    ``cache`` (when given) for later epochs; a mask with a value INFO.json does not list fails there with
    a :class:`DataError` naming the file.
    """

    def __init__(
        self,
        items: list[SemSegItem],
        info: SemSegInfo,
        transform: SeededTransform | None,
        in_channels: int = 1,
        normalize: Literal["unit", "imagenet"] = "unit",
        cache: SampleCache | None = None,
    ) -> None:
        self.items = items
        self.cache = cache
        self.info = info
        self.transform = transform
        self.in_channels = in_channels
        self.normalize = normalize
        self.has_volumes = bool(items) and items[0].volume is not None

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, item: SemSegItem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B-scan (uint8), class labels (uint8) and annotated pixels (uint8 fov) of one item."""
        image = read_image(item.image, "L")
        if item.mask is not None:
            labels, valid = self.info.to_labels(read_value_mask(item.mask), item.mask)
            if labels.shape != image.shape:
                raise DataError(
                    f"{item.mask}: class map is {labels.shape[1]}x{labels.shape[0]} but its B-scan {item.image} is "
                    f"{image.shape[1]}x{image.shape[0]} (W x H); they must match"
                )
        else:
            labels, valid = np.zeros_like(image), np.ones(image.shape, dtype=bool)
        return image, labels, valid.astype(np.uint8)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image, labels, fov = cached(self.cache, (str(item.image), str(item.mask)), lambda: self.decode(item))
        if self.transform is not None:
            out = self.transform(image=image, mask=labels, fov=fov)
            image, labels, fov = out["image"], out["mask"], out["fov"]
        if self.in_channels == 3:
            image = np.repeat(image[..., None], 3, axis=2)
        if self.normalize == "imagenet":
            tensor = image_to_tensor(image, IMAGENET_MEAN, IMAGENET_STD)
        else:
            tensor = image_to_tensor(image)
        sample = {"image": tensor, "fov": mask_to_tensor(fov), "id": item.id, "size": torch.tensor(image.shape[:2])}
        if item.mask is not None:
            sample["mask"] = mask_to_tensor(labels)
        if self.has_volumes:
            sample["volume"] = item.volume
        return sample


class OCTSemSegDataModule(BaseDataModule):
    """OCT B-scan semantic segmentation in the MIRAGE benchmark layout (see the module docstring).

    Args:
        root: the dataset folder (holding ``INFO.json`` and ``train/``, ``val/``, ``test/``, or, for an
            evaluation-only set, ``bscan/`` and ``semseg/``).
        batch_size, eval_batch_size, num_workers, seed: see :class:`~octlightning.data.base.BaseDataModule`.
        val_fraction: must stay 0: the layout brings its own ``val/``.
        test_fraction: must stay 0: the layout brings its own ``test/``.
        num_folds: must stay 0 (the layout brings its own ``test/``, so there is nothing to cross-validate).
        fold: not used (``num_folds`` is 0).
        info: the ``INFO.json`` to use (default ``<root>/INFO.json``).
        ignore_labels: INFO.json labels (substrings, case-insensitive) that mark unannotated pixels
            (default ``["invalid"]``).
        in_channels: 1 (gray) or 3 (gray repeated, for RGB-pretrained encoders such as RETFound).
        normalize: ``unit`` (intensities / 255, MIRAGE) or ``imagenet`` (ImageNet mean/std, RETFound;
            needs ``in_channels=3``).
        augment: horizontal flips and brightness/contrast changes during training.
        pad_to: batches are padded to a multiple of this (the network's stride; 1 for networks that
            resize their input themselves); padded pixels get ``fov = 0``.
        volume_pattern: regular expression on file stems whose group 1 is the volume id (default
            ``<volume>_<digits>``); ``null`` disables per-volume scores.
        predict_dir: folder of B-scans to predict; ``None`` predicts the test split's B-scans.
        test_dir: another dataset in this layout, with the same INFO.json classes, whose every annotated
            B-scan ``test`` scores (its ``train/``, ``val/`` and ``test/``, or an evaluation-only
            ``bscan/`` + ``semseg/``); ``None`` tests ``root``'s ``test/``.
        cache_mb: memory per loader process for decoded training and validation B-scans and class maps
            (see :class:`~octlightning.data.base.SampleCache`; 0 decodes every file at every epoch).
    """

    own_splits = {"val": "the layout's val/ folder", "test": "the layout's test/ folder"}

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 42,
        val_fraction: float = 0.0,
        test_fraction: float = 0.0,
        predict_dir: str | None = None,
        in_channels: Literal[1, 3] = 1,
        cache_mb: float = 1024,
        test_dir: str | None = None,
        num_folds: int = 0,
        fold: int = 0,
        info: str | None = None,
        ignore_labels: list[str] | None = None,
        normalize: Literal["unit", "imagenet"] = "unit",
        augment: bool = True,
        pad_to: int = 32,
        volume_pattern: str | None = DEFAULT_VOLUME_PATTERN,
    ) -> None:
        super().__init__(
            root, batch_size, eval_batch_size, num_workers, seed, val_fraction, test_fraction, predict_dir,
            in_channels, cache_mb, test_dir, num_folds=num_folds, fold=fold,
        )  # fmt: skip
        self.save_hyperparameters()
        if normalize == "imagenet" and in_channels != 3:
            raise ConfigError(
                "--data.init_args.normalize imagenet needs --data.init_args.in_channels 3 "
                "(ImageNet statistics are per RGB channel)"
            )
        self.info_path = Path(info) if info is not None else Path(root) / "INFO.json"
        self.ignore_labels = tuple(ignore_labels) if ignore_labels is not None else DEFAULT_IGNORE_LABELS
        self.normalize = normalize
        self.augment = augment
        self.pad_to = pad_to
        self.volume_pattern = volume_pattern
        self._info: SemSegInfo | None = None

    @property
    def info(self) -> SemSegInfo:
        if self._info is None:
            if not self.info_path.exists():  # read before setup (data -> model links): a wrong root?
                self.require_sources("fit")
            self._info = read_info(self.info_path, self.ignore_labels)
        return self._info

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def class_names(self) -> list[str]:
        """Foreground class names (for ``SegmentationTask(class_names=...)``)."""
        return self.info.foreground_names

    def _split_folder(self, split: str) -> Path:
        return split_folder(Path(self.root), split)

    def _dataset(self, items: list[SemSegItem], train: bool, cache: bool = False) -> OCTSemSegDataset:
        transform = None
        if train and self.augment:
            transform = segmentation_augmentation(hflip=0.5, brightness_contrast=0.5, extra_masks=("fov",))
        cached = self.cache if cache else None  # test/predict read each file once
        return OCTSemSegDataset(items, self.info, transform, self.in_channels, self.normalize, cached)

    def _held_out_items(self, root: Path) -> list[SemSegItem]:
        """Every annotated B-scan of another dataset in this layout (all its splits)."""
        require_dir(root, "test_dir dataset")
        info_path = root / "INFO.json"
        if info_path.is_file():
            other = read_info(info_path, self.ignore_labels)
            if (other.values, other.names) != (self.info.values, self.info.names):
                raise DataError(
                    f"{info_path}: classes {list(other.names)} (values {list(other.values)}) differ from "
                    f"{self.info_path}'s {list(self.info.names)} ({list(self.info.values)}); cannot score them"
                )
        folders = [root / s for s in ("train", "val", "test") if (root / s).is_dir()] or [split_folder(root, "test")]
        items = [item for folder in folders for item in scan_split(folder, True, self.volume_pattern)]
        ids = [i.id for i in items]
        if len(set(ids)) != len(ids):
            raise DataError(f"{root}: a B-scan name occurs in two of its splits; ids must be unique to be scored")
        return items

    def setup(self, stage: str) -> None:
        self.require_sources(stage)
        self._info = read_info(self.info_path, self.ignore_labels)  # fail early on a bad INFO.json
        if stage in ("fit", "validate"):
            train = scan_split(self._split_folder("train"), True, self.volume_pattern)
            self.train_set = self._dataset(train, True, cache=True)
            val = scan_split(self._split_folder("val"), True, self.volume_pattern)
            self.val_set = self._dataset(val, False, cache=True)
        if stage == "test":
            if self.test_dir is not None:
                items = self._held_out_items(Path(self.test_dir))
            else:
                items = scan_split(self._split_folder("test"), True, self.volume_pattern)
            self.test_set = self._dataset(items, False)
        if stage == "predict":
            if self.predict_dir is not None:
                paths = list_images(require_dir(Path(self.predict_dir), "predict"))
                if not paths:
                    raise DataError(f"{self.predict_dir}: no B-scans to predict")
                items = [SemSegItem(k, p, None, None) for k, p in unique_index(paths, what="B-scan").items()]
            else:
                items = [
                    SemSegItem(i.id, i.image, None, None)
                    for i in scan_split(self._split_folder("test"), False, self.volume_pattern)
                ]
            self.predict_set = self._dataset(items, False)

    def collate_fn(self, train: bool):
        return make_pad_collate(self.pad_to, ("image", "mask", "fov"))
