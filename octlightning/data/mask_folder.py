"""Binary segmentation from an image folder and a mask folder: ISIC 2018 Task 1 naming by default.

The default layout is the ISIC 2018 lesion-segmentation download::

    <root>/ISIC2018_Task1-2_Training_Input/<id>.jpg
    <root>/ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png
    <root>/ISIC2018_Task1-2_Validation_Input/ + ISIC2018_Task1_Validation_GroundTruth/   (when present)
    <root>/ISIC2018_Task1-2_Test_Input/ + ISIC2018_Task1_Test_GroundTruth/               (when present)

Other sets need only other names: Kvasir-SEG is ``image_dir="images"``, ``mask_dir="masks"``,
``mask_pattern="{stem}.jpg"``, ``mask_threshold=127`` (its masks are lossy JPEGs); PH2 as distributed is
``image_dir=mask_dir="PH2 Dataset images"``, ``image_glob="*/*_Dermoscopic_Image/*.bmp"``,
``mask_pattern="{stem}/{stem}_lesion/{stem}_lesion.bmp"``.

Images of any size are resized to ``image_size`` (ImageNet-normalised); every sample keeps its file's
``file_size`` so that predictions are written back at that size. ISIC images are large (up to about
6700 x 4500 px) and there are thousands, so :meth:`setup` checks names, pairs and the image headers
(readable, mask and image of equal size) of every file, and pixels are decoded in the loader workers;
a mask that is not binary or a truncated file is then an error naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from octlightning.data.base import BaseDataModule, SampleCache, cached, image_size_pair, split_indices
from octlightning.data.io import (
    check_pairs,
    list_images,
    oriented_size,
    read_image,
    read_mask,
    require_dir,
    require_utf8_name,
)
from octlightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SeededTransform,
    image_to_tensor,
    mask_to_tensor,
    segmentation_augmentation,
)
from octlightning.errors import ConfigError, DataError

ISIC_TRAIN = ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth")
ISIC_VAL = ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth")
ISIC_TEST = ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth")


@dataclass(frozen=True)
class MaskPair:
    """One image file, its mask file (``None`` when predicting) and the image's ``(height, width)``."""

    id: str
    image: Path
    mask: Path | None
    size: tuple[int, int]


def mask_name_regex(pattern: str) -> re.Pattern[str]:
    """Regex that recognises mask paths written by ``pattern`` and captures the image stem.

    ``pattern`` is a path relative to the mask folder with one or more ``{stem}`` fields (all the
    same stem), e.g. ``{stem}_segmentation.png`` or ``{stem}/{stem}_lesion/{stem}_lesion.bmp``.
    """
    parts = pattern.split("{stem}")
    if len(parts) < 2:
        raise ConfigError(
            f"--data.init_args.mask_pattern {pattern!r} must contain {{stem}} (the image name without extension)"
        )
    rx = re.escape(parts[0]) + r"(?P<stem>[^/]+)"
    for part in parts[1:-1]:
        rx += re.escape(part) + r"(?P=stem)"
    return re.compile(rx + re.escape(parts[-1]))


def scan_pairs(
    image_dir: Path, mask_dir: Path | None, image_glob: str = "*.jpg", mask_pattern: str = "{stem}_segmentation.png"
) -> list[MaskPair]:
    """Pair every image matching ``image_glob`` with its mask (``mask_pattern``); sorted by id.

    An image without a mask, a mask without an image, two images with one name, an unreadable header
    or a mask whose size differs from its image's is a :class:`DataError` naming the files. Files in
    the mask folder that do not match the pattern (ISIC's LICENSE/ATTRIBUTION texts) are ignored.
    """
    require_dir(image_dir, "image")
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        require_dir(mask_dir, "mask")
        rx = mask_name_regex(mask_pattern)
        for path in sorted(mask_dir.glob(mask_pattern.replace("{stem}", "*"))):
            m = rx.fullmatch(path.relative_to(mask_dir).as_posix())
            if m and path.is_file():
                masks[m["stem"]] = require_utf8_name(path)
    mask_files = set(masks.values())
    images: dict[str, Path] = {}
    for path in sorted(image_dir.glob(image_glob)):
        # An image glob may also match the masks when both share a folder (e.g. *.png, {stem}_mask.png).
        if not path.is_file() or path.name.startswith(".") or path in mask_files:
            continue
        require_utf8_name(path)  # the stem becomes the sample id, written to logs and tables
        if path.stem in images:
            raise DataError(f"two images named {path.stem!r}: {images[path.stem]} and {path}; ids must be unique")
        images[path.stem] = path
    if not images:
        raise DataError(f"{image_dir}: no images matching {image_glob!r}")
    if mask_dir is not None:
        check_pairs(images, masks, f"mask ({mask_dir}/{mask_pattern})")
    pairs = []
    for key in sorted(images):
        size = oriented_size(images[key])
        if mask_dir is not None:
            mask_size = oriented_size(masks[key], "mask")
            if mask_size != size:
                raise DataError(
                    f"{masks[key]}: mask is {mask_size[1]}x{mask_size[0]} but its image {images[key]} is "
                    f"{size[1]}x{size[0]} (W x H); they must match"
                )
        pairs.append(MaskPair(key, images[key], masks.get(key), size))
    return pairs


def collate_file_masks(samples: list[dict]) -> dict:
    """``default_collate``, except ``file_mask``: masks of different file sizes stay a list of tensors."""
    masks = [s.pop("file_mask") for s in samples if "file_mask" in s]
    batch = default_collate(samples)
    if masks:
        batch["file_mask"] = masks
    return batch


class MaskFolderDataset(Dataset):
    """Pairs -> dict(image (3, H, W) ImageNet-normalised, mask (1, H, W) {0,1}, id, file_size (2,)).

    ``mask`` is absent for pairs without a mask (prediction). With ``file_masks`` (the test set) each
    sample also carries ``file_mask``, the reference as stored, ``(1, *file_size)`` uint8, which the
    test scores are computed against (the ISIC protocol). Decoding happens here, in the workers; the
    decoded, resized pair is kept in ``cache`` (when given) for later epochs.
    """

    def __init__(
        self,
        pairs: list[MaskPair],
        image_size: tuple[int, int],
        transform: SeededTransform | None = None,
        mask_threshold: int | None = None,
        cache: SampleCache | None = None,
        file_masks: bool = False,
    ) -> None:
        self.pairs = pairs
        self.file_masks = file_masks
        self.image_size = image_size
        self.transform = transform
        self.mask_threshold = mask_threshold
        self.cache = cache

    def __len__(self) -> int:
        return len(self.pairs)

    def decode(self, pair: MaskPair) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The pair decoded and resized to ``image_size``: uint8 RGB image, uint8 {0, 1} mask or None,
        and the mask at the file's size (uint8 {0, 1}) or None."""
        h, w = self.image_size
        image = read_image(pair.image, "RGB")
        # Area averaging when shrinking (large dermoscopy photos), bilinear when enlarging.
        shrink = image.shape[0] * image.shape[1] > h * w
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        mask = file_mask = None
        if pair.mask is not None:
            file_mask = read_mask(pair.mask, self.mask_threshold)
            mask = cv2.resize(file_mask, (w, h), interpolation=cv2.INTER_NEAREST)
        return image, mask, file_mask

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        key = (str(pair.image), str(pair.mask), self.image_size)
        if self.file_masks:  # the test set: read once, nothing to cache
            image, mask, file_mask = self.decode(pair)
        else:  # the cache keeps the resized pair only
            image, mask, file_mask = cached(self.cache, key, lambda: self.decode(pair)[:2] + (None,))
        if self.transform is not None and mask is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        sample = {
            "image": image_to_tensor(image, IMAGENET_MEAN, IMAGENET_STD),
            "id": pair.id,
            "file_size": torch.tensor(pair.size),
        }
        if mask is not None:
            sample["mask"] = mask_to_tensor(mask)
        if self.file_masks and file_mask is not None:
            sample["file_mask"] = torch.from_numpy(np.ascontiguousarray(file_mask)).unsqueeze(0)
        return sample


class MaskFolderDataModule(BaseDataModule):
    """Binary segmentation DataModule for image/mask folders (ISIC 2018 Task 1 layout by default).

    Folders are relative to ``root`` (absolute paths work too). The validation and test folders are
    used when present; otherwise ``val_fraction``/``test_fraction`` of the training images are held
    out, by a split seeded with ``seed``.

    Args:
        root: dataset folder.
        batch_size, eval_batch_size, num_workers, seed: see :class:`~octlightning.data.base.BaseDataModule`.
        in_channels: 3: images are read as RGB (dermoscopy, endoscopy photographs).
        image_dir: training images.
        mask_dir: training masks.
        val_image_dir: validation images, used when the folder exists (``None``: always split the
            training set).
        val_mask_dir: validation masks.
        test_image_dir: test images, used when the folder exists; ``predict`` needs only these.
        test_mask_dir: test masks, which ``test`` needs.
        image_glob: which files in an image folder are images (``*.jpg``; ``*.png``; ``*/*.bmp``).
        mask_pattern: a mask's path relative to its folder, ``{stem}`` = the image name without
            extension (``{stem}_segmentation.png`` for ISIC, ``{stem}.png``, ...).
        image_size: network input ``(height, width)`` (or one int for a square) every image is resized to.
        val_fraction: share of training images held out for validation without a validation folder.
        test_fraction: share held out for ``test``/``predict`` without a test folder (0: none).
        augment: flips, rotation and Gaussian noise during training.
        mask_threshold: ``None`` reads masks as strictly two-valued (0/1, 0/255, 1-bit, palette); a grey
            level binarises lossy masks (``> mask_threshold`` is foreground) instead.
        predict_dir: folder of images to predict (any image type); ``None`` predicts the test images.
        test_dir: another dataset folder of the same layout (the same folder names, ``image_glob`` and
            ``mask_pattern``) whose every pair ``test`` scores: its training, validation and test folders,
            those that exist; ``None`` tests ``root``'s test folder or held-out share.
        num_folds: image-wise k-fold cross-validation of a dataset without a test folder (0: none): the
            test split is fold ``fold`` of ``num_folds`` folds of the training images, in place of
            ``test_fraction``; validation is ``val_fraction`` of the other images.
        fold: the fold (0-based, below ``num_folds``) that is the test split.
        cache_mb: memory per loader process for decoded, resized training and validation pairs (see
            :class:`~octlightning.data.base.SampleCache`; 0 decodes every file at every epoch).
    """

    num_classes = 1  # binary: one foreground logit
    class_names = ["lesion"]
    channel_choices = {3: "RGB"}

    def __init__(
        self,
        root: str,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 42,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        predict_dir: str | None = None,
        in_channels: Literal[3] = 3,
        cache_mb: float = 1024,
        test_dir: str | None = None,
        num_folds: int = 0,
        fold: int = 0,
        image_dir: str = ISIC_TRAIN[0],
        mask_dir: str = ISIC_TRAIN[1],
        val_image_dir: str | None = ISIC_VAL[0],
        val_mask_dir: str | None = ISIC_VAL[1],
        test_image_dir: str | None = ISIC_TEST[0],
        test_mask_dir: str | None = ISIC_TEST[1],
        image_glob: str = "*.jpg",
        mask_pattern: str = "{stem}_segmentation.png",
        image_size: int | tuple[int, int] = 256,
        augment: bool = True,
        mask_threshold: int | None = None,
    ) -> None:
        super().__init__(
            root, batch_size, eval_batch_size, num_workers, seed, val_fraction, test_fraction, predict_dir,
            in_channels, cache_mb, test_dir, num_folds=num_folds, fold=fold,
        )  # fmt: skip
        self.save_hyperparameters()
        mask_name_regex(mask_pattern)  # a bad pattern fails at construction, not in setup
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.val_dirs = (val_image_dir, val_mask_dir)
        self.test_dirs = (test_image_dir, test_mask_dir)
        self.image_glob = image_glob
        self.mask_pattern = mask_pattern
        self.image_size: tuple[int, int] = image_size_pair(image_size)
        self.augment = augment
        self.mask_threshold = mask_threshold
        self._split: dict[str, list[MaskPair]] | None = None

    # ----------------------------------------------------------------- files
    def _present(self, folder: str | None) -> Path | None:
        return None if folder is None or not (Path(self.root) / folder).is_dir() else Path(self.root) / folder

    def _scan(
        self, dirs: tuple[str | None, str | None], masks: bool, what: str, root: str | None = None
    ) -> list[MaskPair]:
        image_dir, mask_dir = (Path(root or self.root) / d if d is not None else None for d in dirs)
        if masks and what != "training" and (mask_dir is None or not mask_dir.is_dir()):
            raise DataError(
                f"{image_dir}: {what} images without their ground-truth folder {mask_dir}; add the masks, or "
                f"set {what}_image_dir to null to hold out part of the training images instead"
            )
        return scan_pairs(image_dir, mask_dir if masks else None, self.image_glob, self.mask_pattern)

    def splits(self) -> dict[str, list[MaskPair]]:
        """``train``/``val``/``test`` pairs: the folders that exist, else the seeded training-set split."""
        if self._split is None:
            pairs = self._scan((self.image_dir, self.mask_dir), True, "training")
            has_val = self._present(self.val_dirs[0]) is not None
            has_test = self._present(self.test_dirs[0]) is not None
            if has_test and self.num_folds:
                raise DataError(
                    f"{self._present(self.test_dirs[0])}: the dataset's own test folder is its test split, so "
                    f"num_folds {self.num_folds} has no test split to draw; set num_folds 0, or test_image_dir null "
                    f"to cross-validate on the training images"
                )
            fractions = [0.0 if has_val else self.val_fraction, 0.0 if has_test else self.test_fraction]
            train, val, test = split_indices([p.id for p in pairs], fractions, self.seed, self.num_folds, self.fold)
            self._split = {
                "train": [pairs[i] for i in train],
                "val": [pairs[i] for i in val],
                "test": [pairs[i] for i in test],
            }
            if has_val:
                self._split["val"] = self._scan(self.val_dirs, True, "val")
            own = [f"{split} from {self._present(dirs[0])}" for split, dirs, has in
                   (("validation", self.val_dirs, has_val), ("test", self.test_dirs, has_test)) if has]  # fmt: skip
            if own:  # the recipe's fractions give way to the layout's folders: say so
                rank_zero_info(f"MaskFolderDataModule: the dataset's own split folders: {'; '.join(own)}")
            if len(test):
                self.warn_unused_test_split(f"{len(test)} images")
            if any(fractions) or self.num_folds:  # say what the seeded split of the training images gave
                # only the parts drawn from the training images: a part from its own folder is said above
                drawn = {"train": True, "val": not has_val, "test": not has_test}
                counts = ", ".join(f"{k} {len(v)}" for k, v in self._split.items() if drawn[k])
                rank_zero_info(
                    f"MaskFolderDataModule: {self.root}: {len(pairs)} training images split (seed {self.seed}"
                    f"{self.fold_note}): {counts} images"
                )
        return self._split

    def _held_out_pairs(self) -> list[MaskPair]:
        """Every pair of ``test_dir``: its training, validation and test folders that exist."""
        root = Path(self.test_dir)
        require_dir(root, "test_dir dataset")
        pairs: list[MaskPair] = []
        for dirs, what in (
            ((self.image_dir, self.mask_dir), "training"),
            (self.val_dirs, "val"),
            (self.test_dirs, "test"),
        ):
            if dirs[0] is not None and (root / dirs[0]).is_dir():
                pairs += self._scan(dirs, True, what, str(root))
        if not pairs:
            raise DataError(
                f"{root}: no image folder ({self.image_dir}, {self.val_dirs[0]}, {self.test_dirs[0]}) to test on"
            )
        ids = [p.id for p in pairs]
        if len(set(ids)) != len(ids):
            raise DataError(f"{root}: an image name occurs in two of its folders; ids must be unique to be scored")
        rank_zero_info(f"MaskFolderDataModule: testing on all {len(pairs)} image/mask pairs of {root}")
        return pairs

    def _test_pairs(self, masks: bool) -> list[MaskPair]:
        if self._present(self.test_dirs[0]) is not None:
            return self._scan(self.test_dirs, masks, "test")
        pairs = self.splits()["test"]
        if not pairs:
            raise DataError(
                f"{self.root}: no test folder ({self.test_dirs[0]}) and test_fraction is 0; "
                f"add the folder, set test_fraction, or give predict_dir to predict"
            )
        return pairs

    # ----------------------------------------------------------------- Lightning hooks
    def collate_fn(self, train: bool):
        return None if train else collate_file_masks

    def setup(self, stage: str) -> None:
        self.require_sources(stage)
        if stage in ("fit", "validate"):
            split = self.splits()
            if not split["val"]:
                raise DataError(f"{self.root}: no validation folder and val_fraction is 0, nothing to validate on")
            a = self.augment
            transform = segmentation_augmentation(
                hflip=0.5 if a else 0, vflip=0.5 if a else 0, rotate_limit=45 if a else 0, noise=0.25 if a else 0
            )
            self.train_set = MaskFolderDataset(
                split["train"], self.image_size, transform, self.mask_threshold, self.cache
            )
            self.val_set = MaskFolderDataset(split["val"], self.image_size, None, self.mask_threshold, self.cache)
        if stage == "test":
            # Test and predict read each image once: nothing to gain from keeping them.
            pairs = self._held_out_pairs() if self.test_dir is not None else self._test_pairs(masks=True)
            self.test_set = MaskFolderDataset(pairs, self.image_size, None, self.mask_threshold, file_masks=True)
        if stage == "predict":
            if self.predict_dir is not None:
                folder = require_dir(Path(self.predict_dir), "predict")
                paths = list_images(folder)
                if not paths:
                    raise DataError(f"{folder}: no images to predict")
                if len({p.stem for p in paths}) != len(paths):
                    raise DataError(f"{folder}: several images share a name (stem); outputs would overwrite")
                pairs = [MaskPair(p.stem, p, None, oriented_size(p)) for p in paths]
            else:
                pairs = [MaskPair(p.id, p.image, None, p.size) for p in self._test_pairs(masks=False)]
            self.predict_set = MaskFolderDataset(pairs, self.image_size)
