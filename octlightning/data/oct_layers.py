"""OCT retinal-layer boundaries from HDF5: B-scans and, per column, the row of each chosen boundary.

One job (the dataset and DataModule of one layout), though past 400 lines: most of it is the options that
real layer files need (dataset names, axes, split and NaN policies) and their checks.

The file (:mod:`octlightning.data.formats.layer_h5`, which reads and writes it) holds ``images``
``(N, H, W)`` grayscale B-scans and ``layer_maps`` ``(N, W, L)`` with the row (y, pixels) of every
boundary in every column, NaN where a grader left it unannotated; optionally ``subject`` ``(N,)`` for
subject-wise splits (``fluid_masks`` and other datasets are ignored). The dataset names are
configurable: the Duke AMD export calls them ``images``/``layerMaps``.

Samples are dicts with ``image`` ``(C, H_in, W_in)``, ``coords`` ``(L, output_width)`` boundary rows in
*input* pixels (NaN where unannotated), ``valid`` ``(L, output_width)`` bool, ``size`` (original H, W),
``spacing_um`` (axial um per original pixel, NaN when unknown), ``id`` and, when known, ``subject``.
Coordinates follow the pixel-centre convention of image resizing (:mod:`octlightning.data.coords`), so
image and coordinates stay registered.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import h5py
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from octlightning.data.base import BaseDataModule, SampleCache, cached, image_size_pair, split_indices
from octlightning.data.coords import interpolate_gaps, resample_columns, rescale_rows
from octlightning.data.formats.layer_h5 import (
    IMAGE_AXES,
    LAYER_AXES,
    LayerFileIndex,
    check_axes,
    inspect_layer_file,
    read_along_n,
)
from octlightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, LayerAugmentation, SeededTransform
from octlightning.errors import ConfigError, DataError

NanPolicy = Literal["mask", "interpolate"]
SplitBy = Literal["file", "subject", "bscan"]


# ----------------------------------------------------------------------------- dataset
class OCTLayerDataset(Dataset):
    """B-scans and boundary coordinates read lazily from one HDF5 file.

    The file is opened on first access in each process (h5py handles survive neither pickling nor
    fork into loader workers) and one B-scan (one chunk) is read per sample; the resized B-scan and
    its resampled boundaries are kept in ``cache`` (when given) for later epochs.
    """

    def __init__(
        self,
        path: Path,
        indices: Sequence[int],
        image_key: str,
        layer_key: str | None,
        layer_indices: Sequence[int] | None,
        image_size: tuple[int, int],
        output_width: int,
        channels: int = 3,
        nan_policy: NanPolicy = "mask",
        intensity_max: float | None = None,
        spacing_um: float | None = None,
        subjects: np.ndarray | None = None,
        transform: SeededTransform | None = None,
        cache: SampleCache | None = None,
        image_axes: str = IMAGE_AXES,
        layer_axes: str = LAYER_AXES,
    ) -> None:
        self.path = Path(path)
        self.image_axes, self.layer_axes = image_axes, layer_axes
        self.indices = [int(i) for i in indices]
        self.image_key, self.layer_key = image_key, layer_key
        self.layer_indices = None if layer_indices is None else list(layer_indices)
        self.image_size, self.output_width = image_size, output_width
        self.channels, self.nan_policy, self.intensity_max = channels, nan_policy, intensity_max
        self.spacing_um = spacing_um
        self.subjects = subjects
        self.transform = transform
        self.cache = cache
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def _h5(self) -> h5py.File:
        # A handle inherited through fork is not safe to use in the child: reopen per process.
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def _read_image(self, i: int) -> np.ndarray:
        raw = read_along_n(self._h5()[self.image_key], i, self.image_axes, IMAGE_AXES)
        if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
            raise DataError(f"{self.path}: {self.image_key!r}[{i}] holds non-finite (NaN/inf) pixel values")
        top = self.intensity_max
        if top is None:
            top = float(np.iinfo(raw.dtype).max) if np.issubdtype(raw.dtype, np.integer) else 1.0
        return raw.astype(np.float32) / np.float32(top)

    def read_target(self, i: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Boundary rows of file sample ``i`` at ``output_width`` columns, in input pixels, and validity."""
        lm = read_along_n(self._h5()[self.layer_key], i, self.layer_axes, LAYER_AXES).astype(np.float64).T  # (L, W)
        if self.layer_indices is not None:
            lm = lm[self.layer_indices]
        if self.nan_policy == "interpolate":
            lm = interpolate_gaps(lm)
        coords, valid = resample_columns(lm, self.output_width)
        return rescale_rows(coords, height, self.image_size[0]), valid

    def decode(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, tuple[int, int]]:
        """File sample ``i`` before augmentation: resized image in [0, 1], boundary rows at network
        resolution and their validity (``None`` without ``layer_key``), original ``(height, width)``."""
        image = self._read_image(i)
        h, w = image.shape
        hi, wi = self.image_size
        interp = cv2.INTER_AREA if hi * wi < h * w else cv2.INTER_LINEAR
        image = cv2.resize(image, (wi, hi), interpolation=interp)
        coords = valid = None
        if self.layer_key is not None:
            coords, valid = self.read_target(i, h)
        return image, coords, valid, (h, w)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self.indices[index]
        key = (str(self.path), self.image_key, self.layer_key, i)
        image, coords, valid, (h, w) = cached(self.cache, key, lambda: self.decode(i))
        sample: dict[str, Any] = {
            "id": f"{i:05d}",
            "size": torch.tensor([h, w]),
            "spacing_um": torch.tensor(np.nan if self.spacing_um is None else self.spacing_um, dtype=torch.float32),
        }
        if self.subjects is not None:
            sample["subject"] = str(self.subjects[i])
        if coords is not None:
            if self.transform is not None:
                out = self.transform(image=image, coords=coords, valid=valid)
                image, coords, valid = out["image"], out["coords"], out["valid"]
            # Copies (torch.tensor), never views: the arrays may be the cached, read-only ones.
            sample["coords"] = torch.tensor(coords, dtype=torch.float32)
            sample["valid"] = torch.tensor(valid)
        image = torch.tensor(image, dtype=torch.float32).clamp_(0, 1)
        if self.channels == 3:  # replicated grey for ImageNet-pretrained backbones
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            sample["image"] = (image.expand(3, -1, -1) - mean) / std
        else:
            sample["image"] = ((image - 0.5) / 0.25).unsqueeze(0)
        return sample


# ----------------------------------------------------------------------------- data module
class OCTLayerDataModule(BaseDataModule):
    """OCT layer-boundary regression from one HDF5 file, split by subject (or by B-scan), seeded.

    Args:
        root: the HDF5 file.
        batch_size, eval_batch_size, num_workers, seed: see :class:`~octlightning.data.base.BaseDataModule`.
        val_fraction: held out for validation: below 1 a fraction, else a count, of subjects (of
            B-scans with ``split_by: bscan``).
        test_fraction: held out for ``test``, as ``val_fraction`` (0: none).
        test_dir: another HDF5 file of the same layout whose every annotated B-scan ``test`` scores
            (``root``'s splits are not used for it); ``None`` tests ``root``'s test split.
        num_folds: subject-wise k-fold cross-validation (by B-scan with ``split_by: bscan``; 0: none):
            the test split is fold ``fold`` of ``num_folds`` folds of the subjects, in place of
            ``test_fraction``; validation is ``val_fraction`` of the other subjects.
        fold: the fold (0-based, below ``num_folds``) that is the test split.
        predict_dir: HDF5 file to predict (its ``layer_key`` dataset is optional); ``None`` predicts
            what ``test`` scores: every B-scan of ``test_dir`` when given, else the test split.
        in_channels: 3 (grey replicated, ImageNet normalisation, for pretrained backbones) or 1.
        cache_mb: memory per loader process for decoded, resized training and validation B-scans (see
            :class:`~octlightning.data.base.SampleCache`; 0 reads and decompresses them at every epoch).
        layer_indices: which boundaries of ``layer_maps`` to predict, in anatomical order (top first);
            ``None`` takes the first and the last, ILM and Bruch's membrane in the Duke exports
            (Duke DME: ``[0, 7]``, Duke AMD: ``[0, 2]``).
        image_size: network input size, an int (square) or ``[height, width]``.
        output_width: number of predicted columns (the boundary rows are resampled to it).
        boundary_names: one name per chosen boundary, top first (metric and CSV column names); ``None``:
            the file's ``boundary_names`` attribute where it has one, else ``ILM`` and ``BM`` when the
            first and last boundary are chosen (the default), else ``boundary<index>``.
        image_key: the B-scans' dataset name in the file.
        layer_key: the boundary rows' dataset name in the file.
        subject_key: the subject dataset's name (e.g. ``patient_indices`` in other exports), needed to
            split by subject.
        split_by: ``None`` (default): the file's own ``splits`` group when it has one
            (:mod:`~octlightning.data.formats.layer_h5`), else by subject. ``file``: the ``splits``
            group, required. ``subject``: seeded by ``subject_key`` (a file without it is an error
            listing its datasets). ``bscan``: seeded by B-scan, for files without subjects, knowing
            that B-scans of one eye then land in training and test and inflate every metric.
        image_axes: the stored axis order of ``image_key`` (letters ``N``, ``H``, ``W``); MATLAB
            exports store ``HWN``.
        layer_axes: the stored axis order of ``layer_key`` (letters ``N``, ``W``, ``L``); MATLAB exports
            store ``LWN`` (or ``NLW``).
        nan_policy: ``mask`` (unannotated columns carry ``valid = False``; losses and metrics ignore
            them) or ``interpolate`` (interior gaps filled linearly, columns outside the annotation
            stay masked).
        pixel_spacing_um: axial micrometres per original pixel; ``None`` reads the file's
            ``pixel_spacing_um`` attribute (micrometre metrics are skipped when neither is known).
        intensity_max: value mapped to white; ``None``: the dtype maximum for integer images, 1.0 for
            floating-point images.
        augment: flips, vertical shift/scale, intensity and noise for training.
        elastic: probability of the column-wise elastic displacement (with ``augment``).

    B-scans whose chosen boundaries have no annotated column are excluded with a warning naming
    them; they cannot be scored and nothing is invented for them.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 42,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        predict_dir: str | None = None,
        in_channels: Literal[1, 3] = 3,
        cache_mb: float = 1024,
        test_dir: str | None = None,
        num_folds: int = 0,
        fold: int = 0,
        layer_indices: list[int] | None = None,
        boundary_names: list[str] | None = None,
        image_size: int | list[int] = 512,
        output_width: int = 512,
        image_key: str = "images",
        layer_key: str = "layer_maps",
        subject_key: str | None = "subject",
        split_by: SplitBy | None = None,
        image_axes: str = IMAGE_AXES,
        layer_axes: str = LAYER_AXES,
        nan_policy: NanPolicy = "mask",
        pixel_spacing_um: float | None = None,
        intensity_max: float | None = None,
        augment: bool = True,
        elastic: float = 0.0,
    ) -> None:
        super().__init__(
            root, batch_size, eval_batch_size, num_workers, seed, val_fraction, test_fraction, predict_dir,
            in_channels, cache_mb, test_dir, num_folds=num_folds, fold=fold,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["boundary_names"])  # logged by the task, which gets them from here
        if nan_policy not in ("mask", "interpolate"):
            raise ValueError(f"nan_policy must be 'mask' or 'interpolate', not {nan_policy!r}")
        self.image_size = image_size_pair(image_size)
        self.layer_indices = layer_indices
        self.output_width = output_width
        self._boundary_names = boundary_names
        self.image_key, self.layer_key, self.subject_key = image_key, layer_key, subject_key
        if split_by not in (None, "file", "subject", "bscan"):
            raise ValueError(f"split_by must be file, subject, bscan or null, not {split_by!r}")
        self.split_by = split_by
        self.image_axes = check_axes(image_axes, IMAGE_AXES, "image_axes")
        self.layer_axes = check_axes(layer_axes, LAYER_AXES, "layer_axes")
        self.nan_policy = nan_policy
        self.pixel_spacing_um = pixel_spacing_um
        self.intensity_max = intensity_max
        self.augment = augment
        self.elastic = elastic
        self._index: LayerFileIndex | None = None
        self.splits: dict[str, np.ndarray] = {}
        self._told_no_spacing: set[Path] = set()

    def _dataset(
        self, index: LayerFileIndex, ids, layer_key: str | None, transform=None, cache: bool = False
    ) -> OCTLayerDataset:
        spacing = self.pixel_spacing_um if self.pixel_spacing_um is not None else index.spacing_um
        if spacing is None and layer_key is not None and index.path not in self._told_no_spacing:
            self._told_no_spacing.add(index.path)
            warnings.warn(
                f"{index.path}: no pixel_spacing_um attribute, so errors are reported in pixels only (no mae_um); "
                f"set --data.init_args.pixel_spacing_um to the axial micrometres per pixel of the original B-scan",
                stacklevel=2,
            )
        return OCTLayerDataset(
            index.path,
            ids,
            self.image_key,
            layer_key,
            index.layer_indices,
            self.image_size,
            self.output_width,
            self.in_channels,
            self.nan_policy,
            self.intensity_max,
            spacing,
            index.subjects,
            transform,
            self.cache if cache else None,
            index.image_axes,
            index.layer_axes,
        )

    @property
    def num_boundaries(self) -> int:
        """Boundaries predicted per column (``len`` of the resolved ``layer_indices``; reads the file)."""
        return len(self.file_index().layer_indices)

    @property
    def boundary_names(self) -> list[str]:
        """One name per predicted boundary, top first (see ``boundary_names`` above)."""
        index = self.file_index()
        indices = list(index.layer_indices)
        if self._boundary_names is not None:
            if len(self._boundary_names) != len(indices):
                raise ConfigError(
                    f"data boundary_names {self._boundary_names} has {len(self._boundary_names)} names for "
                    f"the {len(indices)} boundaries of layer_indices {indices}"
                )
            return list(self._boundary_names)
        if index.boundary_names is not None:
            return [index.boundary_names[k] for k in indices]
        if indices == [0, index.num_boundaries - 1]:
            return ["ILM", "BM"]  # the first and last boundary of the Duke DME/AMD exports
        return [f"boundary{k}" for k in indices]

    def file_index(self) -> LayerFileIndex:
        """Validate ``root`` once and remember its layout (read before ``setup`` by the data -> model links)."""
        if self._index is None:
            self.require_sources("fit")  # the root: a wrong path is named with its option
            self._index = self._inspect(Path(self.root))
        return self._index

    def _inspect(self, path: Path, require_layers: bool = True) -> LayerFileIndex:
        return inspect_layer_file(
            path,
            self.image_key,
            self.layer_key,
            self.layer_indices,
            self.subject_key,
            require_layers=require_layers,
            image_axes=self.image_axes,
            layer_axes=self.layer_axes,
        )

    def split(self) -> dict[str, np.ndarray]:
        """File indices of the train/val/test B-scans: annotated samples only, grouped by subject."""
        if self.splits:
            return self.splits
        index = self.file_index()
        usable = np.flatnonzero(index.labelled)
        empty = np.flatnonzero(~index.labelled)
        if len(empty):
            warnings.warn(
                f"{index.path}: {len(empty)} B-scan(s) have no annotated column for the chosen boundaries in "
                f"{self.layer_key!r} (all NaN) and are excluded: indices {empty[:20].tolist()}"
                f"{' ...' if len(empty) > 20 else ''}",
                stacklevel=2,
            )
        if len(usable) == 0:
            raise DataError(f"{index.path}: every B-scan's chosen boundaries in {self.layer_key!r} are all NaN")
        split_by = self.split_by or ("file" if index.file_splits is not None else "subject")
        if split_by == "file":
            if self.num_folds:
                raise DataError(
                    f"{index.path}: num_folds {self.num_folds} draws the test split, but the file's own 'splits' group "
                    f"is used; set split_by to subject (or bscan) to cross-validate, or num_folds 0"
                )
            if index.file_splits is None:
                raise DataError(
                    f"{index.path}: split_by is file but the file has no 'splits' group (datasets: {index.datasets}); "
                    f"add splits/train, splits/val (and splits/test) index arrays or set split_by to subject or bscan"
                )
            rank_zero_info(f"OCTLayerDataModule: {index.path}: using the file's own splits (splits/train, val, test)")
            self.splits = {k: np.intersect1d(v, usable) for k, v in index.file_splits.items()}
            return self.splits
        if split_by == "subject":
            if index.subjects is None:
                raise DataError(
                    f"{index.path}: no subject dataset {self.subject_key!r} to split by subject (the file has "
                    f"{index.datasets}); name the file's subject/patient dataset with subject_key (e.g. "
                    f"subject_key: patient_indices), or set split_by: bscan to split by B-scan knowingly: "
                    f"B-scans of one eye in training and test inflate every metric"
                )
            groups = index.subjects[usable]
        else:
            groups = usable
        parts = split_indices(groups, [self.val_fraction, self.test_fraction], self.seed, self.num_folds, self.fold)
        self.splits = {name: usable[p] for name, p in zip(("train", "val", "test"), parts, strict=True)}
        # what each split holds: its subjects, when split by them, and its B-scans
        holds = {
            name: (f"{sorted(set(index.subjects[ids].tolist()))} " if split_by == "subject" else "")
            + f"({len(ids)} B-scans)"
            for name, ids in self.splits.items()
        }
        if len(self.splits["test"]):
            self.warn_unused_test_split(("subjects " if split_by == "subject" else "") + holds["test"])
        if split_by == "subject":  # the held-out subjects are what a result is reported on: name them
            held = "; ".join(f"{name} {text}" for name, text in holds.items())
            if self.test_dir is not None:
                held += f"; test and predict read {self.test_dir} (test_dir)"
            rank_zero_info(
                f"OCTLayerDataModule: {index.path}: split by subject (seed {self.seed}{self.fold_note}): {held}"
            )
        return self.splits

    def setup(self, stage: str) -> None:
        self.require_sources(stage)
        root_needed = stage in ("fit", "validate") or (stage == "test" and self.test_dir is None)
        if root_needed or (stage == "predict" and self.predict_dir is None and self.test_dir is None):
            index = self.file_index()
            split = self.split()
        if stage == "fit":
            transform = None
            if self.augment:
                transform = SeededTransform(LayerAugmentation(elastic=self.elastic))
            self.train_set = self._dataset(index, split["train"], self.layer_key, transform, cache=True)
        if stage in ("fit", "validate"):
            if len(split["val"]) == 0:
                raise DataError(f"{index.path}: the validation split is empty (val_fraction={self.val_fraction})")
            self.val_set = self._dataset(index, split["val"], self.layer_key, cache=True)
        if stage == "test":
            if self.test_dir is not None:
                tindex = self._inspect(Path(self.test_dir))
                everything = np.flatnonzero(tindex.labelled)
                if len(everything) == 0:
                    raise DataError(f"{tindex.path}: no B-scan has an annotated column of the chosen boundaries")
                rank_zero_info(
                    f"OCTLayerDataModule: testing on all {len(everything)} annotated B-scans of {tindex.path}"
                )
                self.test_set = self._dataset(tindex, everything, self.layer_key)
            else:
                if len(split["test"]) == 0:
                    raise DataError(
                        f"{index.path}: the test split is empty (test_fraction={self.test_fraction}); set "
                        f"test_fraction, or test_dir to test on every B-scan of another file"
                    )
                self.test_set = self._dataset(index, split["test"], self.layer_key)
        if stage == "predict":
            # What test scores, unless predict_dir says otherwise: the test_dir file, else root's test split.
            source = self.predict_dir if self.predict_dir is not None else self.test_dir
            if source is None:
                if len(split["test"]) == 0:
                    raise DataError(
                        f"{index.path}: no test split to predict (test_fraction=0); set "
                        f"--data.init_args.predict_dir to an HDF5 file of B-scans to predict"
                    )
                self.predict_set = self._dataset(index, split["test"], self.layer_key)
            else:
                # A file to predict need not be annotated; when it is, the boundaries are drawn too.
                pindex = self._inspect(Path(source), require_layers=False)
                layer_key = self.layer_key if pindex.num_boundaries is not None else None
                self.predict_set = self._dataset(pindex, range(pindex.n), layer_key)
