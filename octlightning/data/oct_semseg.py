"""OCT B-scan semantic segmentation in the MIRAGE benchmark layout, and a converter from the HDF5 format.

The layout, as the MIRAGE segmentation benchmark publishes it (AROI, Duke DME, GOALS, RETOUCH)::

    <dataset>/INFO.json
    <dataset>/{train,val,test}/bscan/<name>.png     B-scans (grayscale)
    <dataset>/{train,val,test}/semseg/<name>.png    class maps, same names, intensity values per class

and the evaluation-only variant (Duke iAMD) with ``bscan/`` and ``semseg/`` directly under
``<dataset>/``. ``INFO.json`` maps class keys to the mask intensity and the class name, e.g.
``{"0": {"value": 0, "label": "Elsewhere"}, "1": {"value": 80, "label": "RNFL"}}``.

Unannotated pixels: an entry whose label contains ``invalid`` (the MIRAGE convention, Duke iAMD's
``"Invalid"``) is not a class; its pixels get ``fov = 0`` so that losses and metrics skip them. The
remaining entries, in key order, are the classes ``0..K-1`` (the key itself when the ignore entries
come last, as the converter below writes them); class 0 is the background of the result tables.

File names ``<volume>_<slice>.png`` (digits after the last underscore) put ``volume`` in every sample,
so that the segmentation task also scores whole volumes.

``python -m octlightning.data.oct_semseg convert <file.h5> <out_dir>`` writes this layout from the
HDF5 OCT format (``images``, ``layer_maps``, ``fluid_masks``, ``subject``, ``bscan_index``; see
:func:`convert_h5`), split by subject.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from octlightning.data.base import (
    BaseDataModule,
    SampleCache,
    cached,
    make_pad_collate,
    split_indices,
)
from octlightning.data.io import check_pairs, list_images, load_image, read_image, require_dir, unique_index
from octlightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SeededTransform,
    image_to_tensor,
    mask_to_tensor,
    segmentation_augmentation,
)
from octlightning.errors import DataError

SPLITS = ("train", "val", "test")
DEFAULT_IGNORE_LABELS = ("invalid",)
DEFAULT_VOLUME_PATTERN = r"(.+)_\d+"


# --------------------------------------------------------------------------- INFO.json
@dataclass(frozen=True)
class SemSegInfo:
    """Classes of a dataset from its ``INFO.json``.

    Attributes:
        values: mask intensity of class ``k`` at index ``k``.
        names: name of class ``k`` at index ``k`` (index 0 is the background).
        ignore_values: mask intensities of unannotated pixels (entries labelled ``invalid``).
        path: the ``INFO.json`` file, for error messages.
    """

    values: tuple[int, ...]
    names: tuple[str, ...]
    ignore_values: tuple[int, ...]
    path: Path

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def foreground_names(self) -> list[str]:
        """Class names without the background, as ``SegmentationTask(class_names=...)`` wants them."""
        return list(self.names[1:])

    def to_labels(self, mask: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Intensity mask -> (class labels uint8, annotated bool); unannotated pixels get label 0.

        A value that INFO.json does not list is an error naming the mask file.
        """
        table_size = max(int(mask.max()), *self.values, *self.ignore_values) + 1
        lut = np.full(table_size, -1, dtype=np.int16)
        for k, v in enumerate(self.values):
            lut[v] = k
        for v in self.ignore_values:
            lut[v] = -2
        mapped = lut[mask]
        unknown = mapped == -1
        if unknown.any():
            bad = np.unique(mask[unknown])
            raise DataError(
                f"{path}: mask values {bad[:10].tolist()} are not listed in {self.path} "
                f"(known values: {list(self.values)}, unannotated: {list(self.ignore_values)})"
            )
        valid = mapped >= 0
        return np.where(valid, mapped, 0).astype(np.uint8), valid

    def to_values(self, labels: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Class labels (and annotated pixels) -> intensity mask, the inverse of :meth:`to_labels`."""
        if labels.size and int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} has no class in {self.path} ({self.num_classes} classes)")
        dtype = np.uint16 if max(self.values + self.ignore_values) > 255 else np.uint8
        out = np.asarray(self.values, dtype=dtype)[labels]
        if valid is not None:
            if not self.ignore_values:
                raise ValueError(f"{self.path} has no 'invalid' entry to mark unannotated pixels with")
            out[~valid] = self.ignore_values[0]
        return out


def read_info(path: str | Path, ignore_labels: tuple[str, ...] | list[str] = DEFAULT_IGNORE_LABELS) -> SemSegInfo:
    """Read and check ``INFO.json``: integer keys, one ``value`` and ``label`` each, unique values.

    Entries whose label contains one of ``ignore_labels`` (case-insensitive) mark unannotated pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: INFO.json not found (it maps class index to mask value and label)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict) or not raw:
        raise DataError(f'{path}: expected an object like {{"0": {{"value": 0, "label": "Background"}}, ...}}')
    entries = []
    for key, entry in raw.items():
        if not re.fullmatch(r"\d+", str(key)):
            raise DataError(f"{path}: key {key!r} is not a class index (a non-negative integer)")
        if not isinstance(entry, dict) or not {"value", "label"} <= set(entry):
            raise DataError(f'{path}: entry {key!r} needs "value" (mask intensity) and "label" (class name)')
        value, label = entry["value"], entry["label"]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536:
            raise DataError(f"{path}: entry {key!r} has value {value!r}; expected an integer 0..65535")
        entries.append((int(key), value, str(label)))
    entries.sort()
    values = [v for _, v, _ in entries]
    duplicated = sorted({v for v in values if values.count(v) > 1})
    if duplicated:
        raise DataError(f"{path}: mask values {duplicated} are used by more than one entry")
    lowered = [s.lower() for s in ignore_labels]
    is_ignore = [any(s in label.lower() for s in lowered) for _, _, label in entries]
    classes = [(v, label) for (_, v, label), ign in zip(entries, is_ignore, strict=True) if not ign]
    if len(classes) < 2:
        raise DataError(f"{path}: needs at least two classes (background and one more), found {len(classes)}")
    return SemSegInfo(
        values=tuple(v for v, _ in classes),
        names=tuple(label for _, label in classes),
        ignore_values=tuple(v for (_, v, _), ign in zip(entries, is_ignore, strict=True) if ign),
        path=path,
    )


def write_info(path: str | Path, names: list[str], values: list[int], ignore_value: int | None = None) -> Path:
    """Write ``INFO.json`` for classes ``0..K-1`` (and an ``Invalid`` entry last for unannotated pixels)."""
    info = {str(k): {"value": int(v), "label": name} for k, (name, v) in enumerate(zip(names, values, strict=True))}
    if ignore_value is not None:
        info[str(len(names))] = {"value": int(ignore_value), "label": "Invalid"}
    path = Path(path)
    path.write_text(json.dumps(info, indent=4) + "\n")
    return path


def read_value_mask(path: Path) -> np.ndarray:
    """A class-map PNG as a 2-D integer array of its stored intensities (8 or 16 bit, gray or equal RGB)."""
    im = load_image(path, "mask")
    if im.mode == "P":
        im = im.convert("RGB")
    arr = np.asarray(im)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: {arr.dtype} class map; expected integer class values (8 or 16 bit)")
    if arr.ndim == 3:
        # Colour masks are refused rather than converted to gray, which could merge two classes.
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise DataError(f"{path}: colour mask; expected a grayscale class map with the values of INFO.json")
        arr = arr[..., 0]
    return arr


# --------------------------------------------------------------------------- files
@dataclass(frozen=True)
class SemSegItem:
    """One B-scan (and its class map, ``None`` when unknown), with its id and volume id."""

    id: str
    image: Path
    mask: Path | None
    volume: str | None


def volume_ids(names: list[str], pattern: str | None, where: Path) -> list[str | None]:
    """Volume id per file stem from ``pattern`` (group 1); ``None`` for all when no name matches.

    Names that match only partly are an error: per-volume scores over an arbitrary subset would mislead.
    """
    if pattern is None:
        return [None] * len(names)
    regex = re.compile(pattern)
    matches = [regex.fullmatch(n) for n in names]
    if not any(matches):
        return [None] * len(names)
    missing = [n for n, m in zip(names, matches, strict=True) if m is None]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} file names do not carry a volume id like the others "
            f"(pattern {pattern!r}), e.g. {missing[:3]}; rename them or set volume_pattern to null"
        )
    return [m.group(1) for m in matches]  # type: ignore[union-attr]


def scan_split(folder: Path, need_masks: bool, volume_pattern: str | None) -> list[SemSegItem]:
    """Pair ``bscan/*.png`` with ``semseg/*.png`` of one split folder (masks optional unless needed)."""
    images = unique_index(list_images(require_dir(folder / "bscan", "B-scan (bscan/)")), what="B-scan")
    if not images:
        raise DataError(f"{folder / 'bscan'}: no B-scan images")
    mask_dir = folder / "semseg"
    if mask_dir.is_dir():
        masks = unique_index(list_images(mask_dir), what="class map")
        check_pairs(images, masks, "class map (semseg/<same name>.png)")
    elif need_masks:
        raise DataError(f"{mask_dir}: class-map folder not found; cannot train on or score this split")
    else:
        masks = {}
    names = sorted(images)
    volumes = volume_ids(names, volume_pattern, folder / "bscan")
    return [SemSegItem(n, images[n], masks.get(n), v) for n, v in zip(names, volumes, strict=True)]


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
        val_fraction, test_fraction: must stay 0: the layout brings its own ``val/`` and ``test/``.
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
        cache_mb: memory per loader process for decoded training and validation B-scans and class maps
            (see :class:`~octlightning.data.base.SampleCache`; 0 decodes every file at every epoch).
    """

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
        info: str | None = None,
        ignore_labels: list[str] | None = None,
        normalize: Literal["unit", "imagenet"] = "unit",
        augment: bool = True,
        pad_to: int = 32,
        volume_pattern: str | None = DEFAULT_VOLUME_PATTERN,
    ) -> None:
        super().__init__(
            root, batch_size, eval_batch_size, num_workers, seed, val_fraction, test_fraction, predict_dir,
            in_channels, cache_mb,
        )  # fmt: skip
        self.save_hyperparameters()
        if val_fraction or test_fraction:
            raise ValueError("val_fraction and test_fraction must be 0: the MIRAGE layout has val/ and test/ folders")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if normalize == "imagenet" and in_channels != 3:
            raise ValueError("normalize='imagenet' needs in_channels=3 (ImageNet statistics are per RGB channel)")
        self.info_path = Path(info) if info is not None else Path(root) / "INFO.json"
        self.ignore_labels = tuple(ignore_labels) if ignore_labels is not None else DEFAULT_IGNORE_LABELS
        self.normalize = normalize
        self.augment = augment
        self.pad_to = pad_to
        self.volume_pattern = volume_pattern
        self.cache = SampleCache(cache_mb)
        self._info: SemSegInfo | None = None

    @property
    def info(self) -> SemSegInfo:
        if self._info is None:
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
        root = Path(self.root)
        require_dir(root, "dataset")
        folder = root / split
        if folder.is_dir():
            return folder
        if split == "test" and (root / "bscan").is_dir():
            return root  # evaluation-only layout: bscan/ and semseg/ directly under the dataset folder
        if (root / "bscan").is_dir():
            raise DataError(f"{root}: evaluation-only dataset (bscan/ and semseg/, no splits); it has no {split}/")
        raise DataError(f"{folder}: split folder not found (expected {root}/{{train,val,test}}/{{bscan,semseg}}/)")

    def _dataset(self, items: list[SemSegItem], train: bool, cache: bool = False) -> OCTSemSegDataset:
        transform = None
        if train and self.augment:
            transform = segmentation_augmentation(hflip=0.5, brightness_contrast=0.5, extra_masks=("fov",))
        cached = self.cache if cache else None  # test/predict read each file once
        return OCTSemSegDataset(items, self.info, transform, self.in_channels, self.normalize, cached)

    def setup(self, stage: str) -> None:
        self._info = read_info(self.info_path, self.ignore_labels)  # fail early on a bad INFO.json
        if stage in ("fit", "validate"):
            train = scan_split(self._split_folder("train"), True, self.volume_pattern)
            self.train_set = self._dataset(train, True, cache=True)
            val = scan_split(self._split_folder("val"), True, self.volume_pattern)
            self.val_set = self._dataset(val, False, cache=True)
        if stage == "test":
            self.test_set = self._dataset(scan_split(self._split_folder("test"), True, self.volume_pattern), False)
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


# --------------------------------------------------------------------------- HDF5 converter
# Layer names of the Duke DME boundary set (Chiu et al. 2015): class k lies between boundaries k-1 and k.
DUKE_BOUNDARIES = ("ILM", "NFL/GCL", "IPL/INL", "INL/OPL", "OPL/ONL", "ISM/ISE", "OS/RPE", "BM")
DUKE_CLASSES = ("Vitreous", "NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE", "Below BM")
IGNORE_VALUE = 255


def layer_class_map(boundaries: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Boundary rows of one B-scan ``(W, L)`` (NaN = unannotated) -> (labels ``(H, W)``, annotated ``(H, W)``).

    Pixel row ``r`` gets class ``k`` = the number of boundaries at or above it (class 0 above the first
    boundary, class ``L`` below the last): a boundary value is the first row of the layer below it.
    Where boundary ``k`` is NaN, its row lies somewhere between the nearest annotated boundaries above
    and below (or the image top/bottom), so the pixels in that range are marked unannotated; every
    other pixel of the column keeps a certain label. A column without any boundary is unannotated.
    """
    b = np.asarray(boundaries, dtype=np.float64)
    width, n_bound = b.shape
    nan = np.isnan(b)
    # Nearest annotated boundary above (forward fill, image top when none) and below (back fill, bottom).
    above = b.copy()
    below = b.copy()
    for k in range(n_bound):
        if k > 0:
            above[:, k] = np.where(nan[:, k], above[:, k - 1], b[:, k])
        else:
            above[:, k] = np.where(nan[:, k], 0.0, b[:, k])
    for k in range(n_bound - 1, -1, -1):
        nxt = below[:, k + 1] if k + 1 < n_bound else np.full(width, float(height))
        below[:, k] = np.where(nan[:, k], nxt, b[:, k])
    rows = np.arange(height, dtype=np.float64).reshape(height, 1)
    labels = np.zeros((height, width), dtype=np.uint8)
    unsure = np.zeros((height, width), dtype=bool)
    for k in range(n_bound):
        # A NaN boundary is certainly above row r when the next annotated boundary is: count it from there.
        labels += below[:, k] <= rows
        if nan[:, k].any():
            unsure |= nan[:, k] & (above[:, k] <= rows) & (rows < below[:, k])
    return labels, ~unsure


def _class_names(boundary_names: list[str], has_fluid: bool) -> list[str]:
    if tuple(boundary_names) == DUKE_BOUNDARIES:
        names = list(DUKE_CLASSES)
    else:
        bounds = ["top", *boundary_names, "bottom"]
        names = [f"{bounds[k]} to {bounds[k + 1]}" for k in range(len(boundary_names) + 1)]
    return [*names, "Fluid"] if has_fluid else names


def convert_h5(
    h5_path: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 42,
    overwrite: bool = False,
    subjects: list[int] | None = None,
) -> Path:
    """Write the MIRAGE layout from an HDF5 OCT file, split by subject (seeded).

    Reads ``images`` (N,H,W) uint8, ``layer_maps`` (N,W,L) boundary rows (NaN = unannotated),
    optional ``fluid_masks`` (N,H,W) (non-zero = fluid), ``subject`` (N,) and ``bscan_index`` (N,);
    boundary names from the ``boundary_names`` attribute (JSON list) when present.

    Classes: ``k`` = between boundary ``k-1`` and ``k`` (0 above the first, ``L`` below the last, see
    :func:`layer_class_map`), then ``Fluid`` painted on top of the layers. Pixels whose layer is not
    annotated (NaN boundaries) and that are not fluid get the INFO.json entry ``Invalid`` (value 255),
    which :class:`OCTSemSegDataModule` excludes from losses and metrics. Files are named
    ``subject<SS>_<BBB>.png`` so that each subject is one volume. ``subjects`` converts only those
    subjects (e.g. to hold some out entirely). Returns ``out_dir``.
    """
    h5_path, out = Path(h5_path), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty; choose another or pass overwrite=True (--overwrite)")
    try:
        fh = h5py.File(h5_path, "r")
    except OSError as err:
        raise DataError(f"{h5_path}: cannot open as HDF5 ({err})") from err
    with fh:
        for name in ("images", "layer_maps", "subject", "bscan_index"):
            if name not in fh:
                raise DataError(f"{h5_path}: dataset {name!r} missing (found {sorted(fh)})")
        images, layers = fh["images"], fh["layer_maps"]
        n, height, width = images.shape
        if images.dtype != np.uint8:
            raise DataError(f"{h5_path}: images are {images.dtype}, expected uint8")
        if layers.ndim != 3 or layers.shape[:2] != (n, width):
            raise DataError(f"{h5_path}: layer_maps {layers.shape} does not match images {images.shape} as (N, W, L)")
        fluid = fh["fluid_masks"] if "fluid_masks" in fh else None
        if fluid is not None and fluid.shape != images.shape:
            raise DataError(f"{h5_path}: fluid_masks {fluid.shape} does not match images {images.shape}")
        all_subjects = np.asarray(fh["subject"][:]).astype(int)
        bscans = np.asarray(fh["bscan_index"][:]).astype(int)
        if all_subjects.shape != (n,) or bscans.shape != (n,):
            raise DataError(
                f"{h5_path}: subject {all_subjects.shape} / bscan_index {bscans.shape} must have shape ({n},)"
            )
        keep = np.arange(n) if subjects is None else np.flatnonzero(np.isin(all_subjects, subjects))
        if subjects is not None and len(keep) == 0:
            raise DataError(
                f"{h5_path}: none of subjects {subjects} present (found {np.unique(all_subjects).tolist()})"
            )
        n_bound = layers.shape[2]
        raw_names = fh.attrs.get("boundary_names")
        boundary_names = json.loads(raw_names) if raw_names is not None else [f"B{k}" for k in range(n_bound)]
        if len(boundary_names) != n_bound:
            raise DataError(f"{h5_path}: boundary_names lists {len(boundary_names)} names for {n_bound} boundaries")

        names = _class_names(boundary_names, fluid is not None)
        step = 254 // max(len(names) - 1, 1)
        values = [k * step for k in range(len(names))]
        out.mkdir(parents=True, exist_ok=True)
        write_info(out / "INFO.json", names, values, IGNORE_VALUE)
        info = read_info(out / "INFO.json")

        parts = split_indices(all_subjects[keep], [val_fraction, test_fraction], seed)
        split_of = {}
        for split, idx in zip(SPLITS, parts, strict=True):
            for i in keep[idx]:
                split_of[int(i)] = split
            for sub in ("bscan", "semseg"):
                (out / split / sub).mkdir(parents=True, exist_ok=True)
        for i in keep:
            labels, valid = layer_class_map(layers[i], height)
            if fluid is not None:
                wet = np.asarray(fluid[i]) > 0
                labels[wet] = len(names) - 1
                valid |= wet
            stem = f"subject{all_subjects[i]:02d}_{bscans[i]:03d}"
            folder = out / split_of[i]
            # Fast zlib level: the default (6) makes PNG encoding most of the conversion time.
            Image.fromarray(np.asarray(images[i])).save(folder / "bscan" / f"{stem}.png", compress_level=1)
            Image.fromarray(info.to_values(labels, valid)).save(folder / "semseg" / f"{stem}.png", compress_level=1)
    groups = {s: sorted({int(all_subjects[i]) for i in keep[idx]}) for s, idx in zip(SPLITS, parts, strict=True)}
    (out / "split.json").write_text(
        json.dumps({"source": str(h5_path), "seed": seed, "subjects": groups}, indent=2) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m octlightning.data.oct_semseg convert <file.h5> <out_dir>``."""
    parser = argparse.ArgumentParser(prog="python -m octlightning.data.oct_semseg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="HDF5 OCT file (layer boundaries, fluid) -> MIRAGE segmentation layout")
    conv.add_argument("h5", help="HDF5 file with images, layer_maps, fluid_masks, subject, bscan_index")
    conv.add_argument("out_dir", help="output dataset folder")
    conv.add_argument("--val-fraction", type=float, default=0.2, help="share of subjects for val/")
    conv.add_argument("--test-fraction", type=float, default=0.2, help="share of subjects for test/")
    conv.add_argument("--seed", type=int, default=42, help="seed of the subject split")
    conv.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    conv.add_argument("--subjects", type=int, nargs="+", default=None, help="convert only these subjects")
    args = parser.parse_args(argv)
    try:
        out = convert_h5(
            args.h5, args.out_dir, args.val_fraction, args.test_fraction, args.seed, args.overwrite, args.subjects
        )
    except (DataError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    split = json.loads((out / "split.json").read_text())["subjects"]
    print(f"wrote {out} (subjects: {split})")


if __name__ == "__main__":
    main()
