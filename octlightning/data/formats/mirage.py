"""The MIRAGE OCT segmentation layout: ``INFO.json``, B-scan and class-map PNGs, read and written.

The layout, as the MIRAGE segmentation benchmark publishes it (AROI, Duke DME, GOALS, RETOUCH; see
``docs/segmentation_benchmark.md`` of github.com/j-morano/MIRAGE)::

    <dataset>/INFO.json
    <dataset>/{train,val,test}/bscan/<name>.png     B-scans (grayscale)
    <dataset>/{train,val,test}/semseg/<name>.png    class maps, same names, intensity values per class

and the evaluation-only variant (Duke iAMD) with ``bscan/`` and ``semseg/`` directly under
``<dataset>/``. ``INFO.json`` maps class keys to the mask intensity and the class name, e.g.
``{"0": {"value": 0, "label": "Elsewhere"}, "1": {"value": 80, "label": "RNFL"}}``; MIRAGE's loader
maps each intensity to its key, which is what :meth:`SemSegInfo.to_labels` does. MIRAGE pairs B-scans
and class maps by sorted order; here they are paired by name, and a missing partner is an error.

Unannotated pixels: an entry whose label contains ``invalid`` (the MIRAGE convention, Duke iAMD's
``"Invalid"``) is not a class; its pixels are reported as not annotated so that losses and metrics
skip them. The remaining entries, in key order, are the classes ``0..K-1`` (the key itself when the
ignore entries come last, as :func:`write_info` writes them); class 0 is the background of the result
tables.

File names ``<volume>_<slice>.png`` (digits after the last underscore) carry a volume id
(:func:`volume_ids`), so that B-scans can also be scored per volume.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from octlightning.data.io import check_pairs, list_images, load_image, require_dir, unique_index
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
    """A class-map PNG as a 2-D integer array of its stored intensities (8 or 16 bit, gray or equal RGB).

    An alpha channel (grey + alpha ``LA``, ``RGBA``, as image editors save a map with transparency)
    is dropped: the class is the stored intensity, whatever its opacity.
    """
    im = load_image(path, "mask")
    if im.mode == "P":
        im = im.convert("RGB")
    if im.mode in ("LA", "La"):
        im = im.getchannel("L")
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


def split_folder(root: Path, split: str) -> Path:
    """The folder of ``split`` (``train``, ``val`` or ``test``) under the dataset folder ``root``.

    An evaluation-only dataset (``bscan/`` and ``semseg/`` directly under ``root``) is its own test
    split and has no other. Raises :class:`DataError` naming the folder when the split is absent.
    """
    root = Path(root)
    require_dir(root, "dataset")
    folder = root / split
    if folder.is_dir():
        return folder
    if split == "test" and (root / "bscan").is_dir():
        return root  # evaluation-only layout: bscan/ and semseg/ directly under the dataset folder
    if (root / "bscan").is_dir():
        raise DataError(f"{root}: evaluation-only dataset (bscan/ and semseg/, no splits); it has no {split}/")
    raise DataError(f"{folder}: split folder not found (expected {root}/{{train,val,test}}/{{bscan,semseg}}/)")


def write_sample(folder: Path, stem: str, image: np.ndarray, values: np.ndarray) -> None:
    """Write one B-scan ``(H, W)`` uint8 and its class map ``(H, W)`` of INFO.json intensities (uint8 or
    uint16, see :meth:`SemSegInfo.to_values`) as ``<folder>/bscan/<stem>.png`` and
    ``<folder>/semseg/<stem>.png``, creating both folders."""
    for sub in ("bscan", "semseg"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    # Fast zlib level: the default (6) makes PNG encoding most of a conversion's time.
    Image.fromarray(np.asarray(image)).save(folder / "bscan" / f"{stem}.png", compress_level=1)
    Image.fromarray(values).save(folder / "semseg" / f"{stem}.png", compress_level=1)
