"""RETOUCH OCT fluid segmentation: MetaImage volumes, cached preprocessing, ROI patch sampling.

Layout (as the challenge publishes it): one folder per case holding ``oct.mhd`` (+ ``oct.raw``, or a
zlib-compressed ``.zraw``) and, for labelled cases, ``reference.mhd`` (+ data file) with 0 background,
1 IRF (intraretinal fluid), 2 SRF (subretinal fluid), 3 PED (pigment epithelial detachment). Case
folders sit directly under ``root`` or one level down (the challenge's
``RETOUCH-TrainingSet-Cirrus/TRAIN001/``). Cases without ``reference.mhd`` (the challenge's test cases)
are prediction-only.

The device vendor of a case is resolved in this order:

1. ``vendor_map[case]`` (the case folder name, e.g. ``{"TRAIN_DUKE01": "Spectralis"}``);
2. ``vendor_pattern`` searched in the case's path below ``root`` (default: ``Cirrus``, ``Spectralis``
   or ``Topcon`` anywhere in it, any case, so ``RETOUCH-TrainingSet-Topcon/TRAIN049`` and
   ``TRAIN_Cirrus_001`` both resolve);
3. otherwise a :class:`DataError` naming the case. The shared ``retouch_like`` cases (TRAIN_DUKE01/02,
   Heidelberg Spectralis) carry no vendor in their names: ``hparams/retouch_unet.json`` maps them.

Preprocessing runs once per dataset and is cached (``cache_dir``, see :func:`default_cache_dir`) in a
folder named by a fingerprint of the settings and of the source files (size, modification time), so
changing a setting or a file builds a new cache and an unchanged dataset reuses it. Per volume:

1. intensities scaled to [0, 255] between robust percentiles (Spectralis ships 16-bit, the others 8-bit);
2. histogram matching to the pooled histogram of the ``histogram_reference`` vendor's volumes;
3. median filtering (speckle);
4. a retina ROI per B-scan (entropy of a smoothed, background-clipped, coarsely quantised B-scan,
   Otsu threshold, morphological closing, holes filled, largest component; reference fluid always
   included);
5. the mean/std of the ROI intensities, used to standardise the network input.

The cache also holds ``index.csv`` (case, vendor, slice, presence of IRF/SRF/PED per B-scan).

Training draws patches (``patch_size`` = height x width, default 256 x 128) centred on ROI pixels: a
fixed share ``positive_fraction`` of each epoch's patches is centred on fluid, the rest holds no fluid
at all; the locations are drawn anew every epoch from the seeded loader RNG. Validation, test and
prediction use whole B-scans with ``id`` ``<case>_<slice>``, ``volume`` ``<case>``, ``voxel_mm3``,
``spacing`` (x, y, z in mm, MetaImage order), ``slice`` and ``num_slices``, so that per-volume scores
(absolute volume difference in mm^3) and ``.mhd`` label volumes can be produced.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.filters.rank import entropy
from skimage.morphology import disk
from torch.utils.data import Dataset

from octlightning.data.base import (
    BaseDataModule,
    SampleCache,
    cached,
    make_pad_collate,
    split_indices,
)
from octlightning.data.io import require_utf8_name, shown_path
from octlightning.data.transforms import SeededTransform, segmentation_augmentation
from octlightning.errors import DataError

VENDORS = ("Cirrus", "Spectralis", "Topcon")
FLUIDS = ("IRF", "SRF", "PED")
DEFAULT_VENDOR_PATTERN = r"(?i)cirrus|spectralis|topcon"
# Bump when the preprocessing code changes what it writes: every cache is rebuilt.
PREPROCESS_VERSION = 1

_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
}


# --------------------------------------------------------------------------- cases and vendors
@dataclass(frozen=True)
class RetouchCase:
    """One case folder on disk."""

    name: str
    folder: Path
    vendor: str
    oct_path: Path
    reference_path: Path | None

    @property
    def labelled(self) -> bool:
        return self.reference_path is not None


def resolve_vendor(case: str, relpath: str, vendor_map: dict[str, str] | None, vendor_pattern: str | None) -> str:
    """The device vendor of a case: ``vendor_map`` first, then ``vendor_pattern`` in its path."""
    by_name = {v.lower(): v for v in VENDORS}
    if vendor_map and case in vendor_map:
        vendor = by_name.get(str(vendor_map[case]).lower())
        if vendor is None:
            raise DataError(f"{case}: vendor_map gives unknown vendor {vendor_map[case]!r}; choose one of {VENDORS}")
        return vendor
    if vendor_pattern:
        m = re.search(vendor_pattern, relpath)
        if m:
            found = m.group(1) if m.groups() else m.group(0)
            vendor = by_name.get(found.lower())
            if vendor is None:
                raise DataError(
                    f"{case}: vendor_pattern matched {found!r} in {relpath!r}, which is not a vendor of {VENDORS}"
                )
            return vendor
    raise DataError(
        f"{case}: cannot tell the OCT device of {relpath!r}; add it to vendor_map "
        f"(e.g. {{{case!r}: 'Spectralis'}}) or name Cirrus, Spectralis or Topcon in the case or parent folder"
    )


def find_cases(
    root: Path, vendor_map: dict[str, str] | None = None, vendor_pattern: str | None = DEFAULT_VENDOR_PATTERN
) -> list[RetouchCase]:
    """Case folders (holding ``oct.mhd``) directly under ``root`` or one level down, sorted by name."""
    if not root.is_dir():
        raise DataError(f"{root}: RETOUCH dataset folder not found")
    folders = sorted({p.parent for pattern in ("*/oct.mhd", "*/*/oct.mhd") for p in root.glob(pattern)})
    orphans = sorted(p.parent for pattern in ("*/reference.mhd", "*/*/reference.mhd") for p in root.glob(pattern))
    orphans = [p for p in orphans if p not in folders]
    if orphans:
        raise DataError(f"{orphans[0] / 'reference.mhd'}: case {orphans[0].name} has a reference but no oct.mhd")
    if not folders:
        raise DataError(f"{root}: no RETOUCH cases found (expected <case>/oct.mhd, optionally <vendor set>/<case>/)")
    cases: dict[str, RetouchCase] = {}
    for folder in folders:
        # Case names become ids, cache folders and table rows; SimpleITK aborts on undecodable paths.
        for part in (folder, folder.parent) if folder.parent != root else (folder,):
            require_utf8_name(part)
        name = folder.name
        if name in cases:
            raise DataError(f"{folder}: case name {name} also used by {cases[name].folder}; case names must be unique")
        relpath = folder.relative_to(root).as_posix()
        vendor = resolve_vendor(name, relpath, vendor_map, vendor_pattern)
        ref = folder / "reference.mhd"
        cases[name] = RetouchCase(name, folder, vendor, folder / "oct.mhd", ref if ref.is_file() else None)
    return [cases[k] for k in sorted(cases)]


# --------------------------------------------------------------------------- MetaImage reading
def _mhd_header(path: Path) -> dict[str, str]:
    header = {}
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            if "=" in line:
                key, value = line.split("=", 1)
                header[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break  # binary data may follow (LOCAL)
    return header


def _check_data_file(path: Path, header: dict[str, str], case: str) -> None:
    """Fail early, with a clear message, when the data file is missing or shorter than the header says."""
    data = header.get("ElementDataFile")
    if data is None:
        raise DataError(f"{case}: {path} has no ElementDataFile line; not a MetaImage header")
    if data == "LOCAL" or data.startswith("LIST") or "%" in data:
        return  # data inside the header file, or a file list: SimpleITK checks these
    data_path = path.parent / data
    if not data_path.is_file():
        raise DataError(f"{case}: {path} names data file {data}, which does not exist ({data_path})")
    size = data_path.stat().st_size
    if header.get("CompressedData", "False").lower() == "true":
        expected = int(header.get("CompressedDataSize", "0") or 0)
        if expected and size < expected:
            raise DataError(
                f"{case}: {data_path} is {size} bytes but {path.name} declares CompressedDataSize = {expected}; "
                f"the file is truncated"
            )
        return
    element = _ELEMENT_BYTES.get(header.get("ElementType", ""))
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
        channels = int(header.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return
    if element and dims:
        expected = int(np.prod(dims)) * element * channels
        if size < expected:
            raise DataError(
                f"{case}: {data_path} is {size} bytes but {path.name} declares {' x '.join(map(str, dims))} "
                f"{header['ElementType']} voxels = {expected} bytes; the file is truncated"
            )


def read_metaimage(path: Path, case: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3-D MetaImage as a ``(slices, rows, columns)`` array and its spacing ``(x, y, z)`` in mm."""
    if not path.is_file():
        raise DataError(f"{case}: {path} not found")
    if path.stat().st_size == 0:
        raise DataError(f"{case}: {path} is empty (0 bytes); not a MetaImage header")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        # SimpleITK's C++ side aborts the whole process on such a path instead of raising.
        raise DataError(f"{case}: {shown_path(path)}: the path is not valid UTF-8; rename the folder") from None
    header = _mhd_header(path)
    if header.get("NDims", "3") != "3":
        raise DataError(f"{case}: {path} has NDims = {header.get('NDims')}; an OCT volume has 3 dimensions")
    _check_data_file(path, header, case)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = " ".join(str(err).split())[-300:]
        raise DataError(f"{case}: SimpleITK cannot read {path} ({reason})") from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{case}: {path} has {image.GetNumberOfComponentsPerPixel()} channels; expected grey values")
    spacing = tuple(float(s) for s in image.GetSpacing())
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise DataError(f"{case}: {path} holds {bad} NaN/inf voxels ({bad / array.size:.2%}); expected finite")
    return array, spacing  # type: ignore[return-value]


def read_case(case: RetouchCase) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """Volume, reference labels (uint8, checked to lie in 0..3) and spacing of one case."""
    volume, spacing = read_metaimage(case.oct_path, case.name)
    if case.reference_path is None:
        return volume, None, spacing
    labels, ref_spacing = read_metaimage(case.reference_path, case.name)
    if labels.shape != volume.shape:
        raise DataError(
            f"{case.name}: reference.mhd is {'x'.join(map(str, labels.shape))} but oct.mhd is "
            f"{'x'.join(map(str, volume.shape))} (slices x rows x columns); they must match"
        )
    if not np.allclose(ref_spacing, spacing, rtol=1e-4, atol=1e-7):
        raise DataError(f"{case.name}: reference.mhd spacing {ref_spacing} differs from oct.mhd spacing {spacing}")
    values = np.unique(labels)
    bad = [v for v in values.tolist() if v not in (0, 1, 2, 3)]
    if bad:
        raise DataError(
            f"{case.name}: reference.mhd has labels {bad[:8]} outside 0..3 (0 background, 1 IRF, 2 SRF, 3 PED)"
        )
    return volume, labels.astype(np.uint8), spacing


# --------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class PreprocessSettings:
    """Everything the cached preprocessing depends on (part of the cache fingerprint)."""

    histogram_reference: str | None = "Spectralis"
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    median_size: int = 3
    roi_downsample: int = 4
    roi_smoothing: float = 1.5
    roi_levels: int = 16
    roi_background_percentile: float = 50.0
    roi_entropy_radius: int = 4
    roi_closing_radius: int = 4


def scale_to_uint8(volume: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """Linear map of the volume's ``percentiles`` to 0 and 255, clipped (vendor bit depths differ)."""
    lo, hi = np.percentile(volume, percentiles)
    if hi <= lo:
        hi = lo + 1
    scaled = (volume.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def grey_histogram(volume: np.ndarray) -> np.ndarray:
    """Normalised 256-bin histogram of a uint8 volume."""
    hist = np.bincount(volume.ravel(), minlength=256).astype(np.float64)
    return hist / hist.sum()


def matching_lut(source_hist: np.ndarray, reference_hist: np.ndarray) -> np.ndarray:
    """Grey-level lookup table that gives the source the reference's histogram (CDF matching)."""
    src_cdf = np.cumsum(source_hist)
    ref_cdf = np.cumsum(reference_hist)
    return np.clip(np.rint(np.interp(src_cdf, ref_cdf, np.arange(256))), 0, 255).astype(np.uint8)


def median_filter(volume: np.ndarray, size: int) -> np.ndarray:
    """Per-B-scan median filter (B-scans are far apart; filtering across them would blur fluid)."""
    if size <= 1:
        return volume
    if size % 2 == 0:
        raise ValueError(f"median_size must be odd, got {size}")
    return np.stack([cv2.medianBlur(np.ascontiguousarray(s), size) for s in volume])


def retina_roi(bscan: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Retina region of one uint8 B-scan: entropy thresholding + morphological closing.

    Speckle makes raw local entropy high everywhere. The B-scan is therefore down-sampled
    (``roi_downsample``), smoothed (``roi_smoothing``), everything below the background level (the
    ``roi_background_percentile`` grey value: most of a B-scan is vitreous or deep background) set
    to 0 and the rest quantised to ``roi_levels`` grey levels; then the layered retina has high local
    entropy and the background none. Otsu splits the two; closing and hole filling make the band
    solid (dark fluid pockets have low entropy) and the largest component is kept.
    """
    h, w = bscan.shape
    f = max(1, settings.roi_downsample)
    small = cv2.resize(bscan, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA).astype(np.float32)
    if settings.roi_smoothing > 0:
        small = cv2.GaussianBlur(small, (0, 0), settings.roi_smoothing)
    floor, top = np.percentile(small, [settings.roi_background_percentile, 99.5])
    levels = max(2, min(256, settings.roi_levels))
    quantised = np.clip((small - floor) * (levels / max(float(top - floor), 1e-6)), 0, levels - 1).astype(np.uint8)
    ent = entropy(quantised, disk(settings.roi_entropy_radius))
    if ent.max() <= ent.min():
        return np.ones_like(bscan, dtype=bool)  # featureless B-scan: nothing to restrict sampling to
    mask = ent > threshold_otsu(ent)
    if settings.roi_closing_radius > 0:
        mask = ndimage.binary_closing(mask, structure=disk(settings.roi_closing_radius), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, range(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def _source_files(case: RetouchCase) -> list[Path]:
    files = []
    for mhd in (case.oct_path, case.reference_path):
        if mhd is None:
            continue
        files.append(mhd)
        data = _mhd_header(mhd).get("ElementDataFile")
        if data and (mhd.parent / data).is_file():
            files.append(mhd.parent / data)
    return files


def cache_fingerprint(
    cases: Sequence[RetouchCase], settings: PreprocessSettings, reference_hist: np.ndarray | None = None
) -> str:
    """Hash of the settings, the code version and every source file's name, size and mtime."""
    sources = []
    for case in cases:
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _source_files(case)]
        sources.append([case.name, case.vendor, str(case.folder.resolve()), stats])
    payload = {"version": PREPROCESS_VERSION, "settings": asdict(settings), "cases": sources}
    if reference_hist is not None:
        payload["reference_hist"] = np.round(reference_hist, 12).tolist()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir(root: Path) -> Path:
    """``<root>/.octlightning-cache`` when the dataset folder is writable, else the user cache folder."""
    if os.access(root, os.W_OK):
        return root / ".octlightning-cache"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return base / "octlightning" / "retouch" / f"{root.name}-{digest}"


def reference_histogram(cases: Sequence[RetouchCase], settings: PreprocessSettings) -> np.ndarray | None:
    """Mean normalised histogram of the reference vendor's scaled volumes (``None``: no matching)."""
    if settings.histogram_reference is None:
        return None
    ref_cases = [c for c in cases if c.vendor == settings.histogram_reference]
    if not ref_cases:
        raise DataError(
            f"histogram matching to {settings.histogram_reference} needs at least one "
            f"{settings.histogram_reference} case; found vendors {sorted({c.vendor for c in cases})} "
            f"(set histogram_reference to one of them, or null to switch matching off)"
        )
    hists = [
        grey_histogram(scale_to_uint8(read_metaimage(c.oct_path, c.name)[0], settings.intensity_percentiles))
        for c in ref_cases
    ]
    return np.mean(hists, axis=0)


def preprocess_case(
    case: RetouchCase, settings: PreprocessSettings, reference_hist: np.ndarray | None
) -> dict[str, Any]:
    """Read, validate and preprocess one case: arrays for the cache and its metadata."""
    volume, labels, spacing = read_case(case)
    image = scale_to_uint8(volume, settings.intensity_percentiles)
    if reference_hist is not None and case.vendor != settings.histogram_reference:
        image = matching_lut(grey_histogram(image), reference_hist)[image]
    image = median_filter(image, settings.median_size)
    roi = np.stack([retina_roi(s, settings) for s in image])
    if labels is not None:
        roi |= labels > 0  # fluid lies in the retina by definition
    inside = image[roi].astype(np.float64) / 255.0 if roi.any() else image.astype(np.float64) / 255.0
    meta = {
        "name": case.name,
        "vendor": case.vendor,
        "shape": list(image.shape),
        "spacing": list(spacing),
        "mean": float(inside.mean()),
        "std": float(max(inside.std(), 1e-3)),
        "labelled": labels is not None,
        "source": str(case.folder),
    }
    return {"image": image, "labels": labels, "roi": roi.astype(np.uint8), "meta": meta}


def build_cache(
    cases: Sequence[RetouchCase],
    settings: PreprocessSettings,
    cache_dir: Path,
    reference_hist: np.ndarray | None = None,
) -> Path:
    """Preprocess every case into ``cache_dir/<fingerprint>/`` unless that cache exists already.

    ``reference_hist`` comes from another dataset's cache when predicting new cases (they are matched
    to the training set's reference); by default it is computed from ``cases``. The cache is written
    to a temporary folder and renamed, so an interrupted build never looks complete.
    """
    own_reference = reference_hist is None
    fingerprint = cache_fingerprint(cases, settings, None if own_reference else reference_hist)
    target = cache_dir / fingerprint
    if (target / "meta.json").is_file():
        return target
    if own_reference:
        reference_hist = reference_histogram(cases, settings)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{fingerprint}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    metas, index_rows = [], []
    try:
        for case in cases:
            out = preprocess_case(case, settings, reference_hist)
            folder = tmp / case.name
            folder.mkdir()
            np.save(folder / "oct.npy", out["image"])
            np.save(folder / "roi.npy", out["roi"])
            labels = out["labels"]
            if labels is not None:
                np.save(folder / "reference.npy", labels)
            metas.append(out["meta"])
            for z in range(out["image"].shape[0]):
                row: dict[str, Any] = {"case": case.name, "vendor": case.vendor, "slice": z}
                for k, fluid in enumerate(FLUIDS, start=1):
                    row[fluid] = "" if labels is None else int(bool((labels[z] == k).any()))
                index_rows.append(row)
        with open(tmp / "index.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["case", "vendor", "slice", *FLUIDS])
            writer.writeheader()
            writer.writerows(index_rows)
        meta = {
            "fingerprint": fingerprint,
            "settings": asdict(settings),
            "reference_hist": None if reference_hist is None else reference_hist.tolist(),
            "cases": metas,
        }
        # meta.json last: its presence marks a complete cache.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same cache first
            if not (target / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- cached volumes
@dataclass(frozen=True)
class CachedCase:
    """Metadata of one preprocessed case (see :func:`preprocess_case`)."""

    name: str
    vendor: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    mean: float
    std: float
    labelled: bool
    source: str

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.spacing))


class VolumeStore:
    """Read access to a cache folder; arrays are memory-mapped lazily in each (worker) process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.meta = meta
        self.cases = {
            m["name"]: CachedCase(
                m["name"],
                m["vendor"],
                tuple(m["shape"]),
                tuple(m["spacing"]),
                m["mean"],
                m["std"],
                m["labelled"],
                m["source"],
            )
            for m in meta["cases"]
        }
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    @property
    def reference_hist(self) -> np.ndarray | None:
        hist = self.meta.get("reference_hist")
        return None if hist is None else np.asarray(hist)

    def index(self) -> list[dict[str, Any]]:
        """Rows of ``index.csv``: case, vendor, slice, IRF/SRF/PED presence (0/1, empty if unlabelled)."""
        with open(self.path / "index.csv", newline="") as fh:
            return list(csv.DictReader(fh))

    def array(self, case: str, kind: str) -> np.ndarray:
        """``kind`` = ``oct`` (uint8 image), ``reference`` (labels) or ``roi`` (0/1)."""
        key = (case, kind)
        if key not in self._arrays:
            self._arrays[key] = np.load(self.path / case / f"{kind}.npy", mmap_mode="r")
        return self._arrays[key]

    def normalised(self, case: str, image: np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W)`` -> standardised float32 ``(1, H, W)`` with the case's ROI statistics."""
        info = self.cases[case]
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)) / 255.0
        return ((t - info.mean) / info.std).unsqueeze(0)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # workers map the files themselves instead of receiving copies
        return state


# --------------------------------------------------------------------------- datasets
class RetouchSliceDataset(Dataset):
    """Whole B-scans -> dict(image (1,H,W), [mask (1,H,W)], size, id, volume, slice, num_slices,
    spacing, voxel_mm3)."""

    def __init__(self, store: VolumeStore, cases: Sequence[str]) -> None:
        self.store = store
        self.items = [(c, z) for c in cases for z in range(store.cases[c].shape[0])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case, z = self.items[index]
        info = self.store.cases[case]
        image = np.asarray(self.store.array(case, "oct")[z])
        sample: dict[str, Any] = {
            "image": self.store.normalised(case, image),
            "size": torch.tensor(image.shape),
            "id": f"{case}_{z:03d}",
            "volume": case,
            "slice": z,
            "num_slices": info.shape[0],
            "spacing": torch.tensor(info.spacing, dtype=torch.float64),
            "voxel_mm3": info.voxel_mm3,
        }
        if info.labelled:
            labels = np.asarray(self.store.array(case, "reference")[z])
            sample["mask"] = torch.from_numpy(labels.astype(np.float32)).unsqueeze(0)
        return sample


def fluid_window_counts(fluid: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """For every pixel, the number of fluid pixels in the ``patch`` centred on it (clipped at borders)."""
    ph, pw = patch
    h, w = fluid.shape
    s = np.zeros((h + 1, w + 1), dtype=np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(fluid, 0), 1)
    r0 = np.clip(np.arange(h) - ph // 2, 0, h)[:, None]
    r1 = np.clip(np.arange(h) - ph // 2 + ph, 0, h)[:, None]
    c0 = np.clip(np.arange(w) - pw // 2, 0, w)[None, :]
    c1 = np.clip(np.arange(w) - pw // 2 + pw, 0, w)[None, :]
    return s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]


def crop_centred(array: np.ndarray, cy: int, cx: int, patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``patch`` centred on ``(cy, cx)``, zero outside the image, and its inside-the-image mask."""
    ph, pw = patch
    h, w = array.shape
    y0, x0 = cy - ph // 2, cx - pw // 2
    out = np.zeros((ph, pw), dtype=array.dtype)
    inside = np.zeros((ph, pw), dtype=np.uint8)
    sy0, sy1, sx0, sx1 = max(0, y0), min(h, y0 + ph), max(0, x0), min(w, x0 + pw)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[sy0:sy1, sx0:sx1]
    inside[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = 1
    return out, inside


class RetouchPatchDataset(Dataset):
    """Training patches centred on ROI pixels, with a fixed share of patches holding fluid.

    Item ``i`` is a positive (centred on a fluid pixel) when ``i < round(positive_fraction * length)``,
    else a negative (no fluid anywhere in the patch); the shuffling sampler mixes them. Where the patch
    lies is drawn at every access from the loader's torch RNG (seeded per worker by Lightning), so each
    epoch sees new patches and runs repeat under the same seed. Samples carry ``fov`` (1 inside the
    B-scan, 0 where the patch overhangs it) and ``centre`` ``(row, column)`` in the B-scan.

    Args:
        balance_fluids: choose the fluid class of a positive patch uniformly among the classes present,
            then a B-scan holding it, so rare classes (PED, SRF) are seen as often as IRF.
        cache: keeps each B-scan's candidate centres (see :meth:`centres`).
    """

    def __init__(
        self,
        store: VolumeStore,
        cases: Sequence[str],
        patch_size: Sequence[int],
        positive_fraction: float,
        length: int,
        transform: SeededTransform | None = None,
        balance_fluids: bool = True,
        cache: SampleCache | None = None,
    ) -> None:
        if not 0 <= positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.store = store
        self.patch = (int(patch_size[0]), int(patch_size[1]))
        self.length = length
        self.n_positive = round(positive_fraction * length)
        self.transform = transform
        self.balance_fluids = balance_fluids
        self.cache = cache
        wanted = set(cases)
        rows = [r for r in store.index() if r["case"] in wanted]
        self.slices = [(r["case"], int(r["slice"])) for r in rows]
        # B-scans holding each fluid class (1..3), and any fluid (0)
        self.with_fluid: dict[int, list[tuple[str, int]]] = {
            k: [(r["case"], int(r["slice"])) for r in rows if r[f] == "1"] for k, f in enumerate(FLUIDS, start=1)
        }
        self.with_fluid[0] = [(r["case"], int(r["slice"])) for r in rows if "1" in (r["IRF"], r["SRF"], r["PED"])]
        self.classes = [k for k in (1, 2, 3) if self.with_fluid[k]]
        if self.n_positive and not self.with_fluid[0]:
            raise DataError(
                f"positive_fraction {positive_fraction} but the training cases {sorted(wanted)} hold no fluid"
            )

    def __len__(self) -> int:
        return self.length

    def centres(self, case: str, z: int, k: int | None) -> np.ndarray:
        """Flat indices of the pixels a patch may be centred on in B-scan ``z`` of ``case``: pixels of
        fluid class ``k`` (0: any fluid), or for ``k=None`` retina (ROI) pixels whose patch holds no fluid.

        Finding them scans the whole B-scan, many times the cost of cutting the patch, so they are kept
        in ``cache`` (when given) and every later patch from this B-scan is a draw from the list.
        """

        def find() -> np.ndarray:
            labels = np.asarray(self.store.array(case, "reference")[z])
            if k is not None:
                return np.flatnonzero(labels == k if k else labels > 0).astype(np.int32)
            allowed = np.asarray(self.store.array(case, "roi")[z]) > 0
            if labels.any():
                allowed &= fluid_window_counts(labels > 0, self.patch) == 0
            return np.flatnonzero(allowed).astype(np.int32)

        return cached(self.cache, ("centres", case, z, k, self.patch), find)

    def locate(self, index: int, rng: np.random.Generator) -> tuple[str, int, int, int]:
        """``(case, slice, row, column)`` of the centre of patch ``index``."""
        if index < self.n_positive:
            k = int(rng.choice(self.classes)) if self.balance_fluids else 0
            case, z = self.with_fluid[k][rng.integers(len(self.with_fluid[k]))]
            candidates = self.centres(case, z, k)
        else:
            for _ in range(100):
                case, z = self.slices[rng.integers(len(self.slices))]
                candidates = self.centres(case, z, None)
                if len(candidates):
                    break
            else:
                raise DataError(
                    f"no fluid-free {self.patch[0]}x{self.patch[1]} patch centred in the retina found in 100 "
                    f"random training B-scans; lower patch_size or raise positive_fraction"
                )
        width = self.store.array(case, "reference").shape[-1]
        y, x = divmod(int(candidates[rng.integers(len(candidates))]), width)
        return case, z, y, x

    def __getitem__(self, index: int) -> dict[str, Any]:
        # One torch draw per access: follows seed_everything / the worker seed, differs every epoch.
        rng = np.random.default_rng([index, int(torch.randint(0, 2**31 - 1, ()).item())])
        case, z, cy, cx = self.locate(index, rng)
        image, fov = crop_centred(np.asarray(self.store.array(case, "oct")[z]), cy, cx, self.patch)
        labels, _ = crop_centred(np.asarray(self.store.array(case, "reference")[z]), cy, cx, self.patch)
        if self.transform is not None:
            out = self.transform(image=image, mask=labels, fov=fov)
            image, labels, fov = out["image"], out["mask"], out["fov"]
        tensor = self.store.normalised(case, image)
        fov_t = torch.from_numpy(np.ascontiguousarray(fov, dtype=np.float32)).unsqueeze(0)
        return {
            "image": tensor * fov_t,  # outside the B-scan: 0, like the padding of whole B-scans
            "mask": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)).unsqueeze(0),
            "fov": fov_t,
            "id": f"{case}_{z:03d}",
            "centre": torch.tensor([cy, cx]),
        }


# --------------------------------------------------------------------------- DataModule
class RetouchDataModule(BaseDataModule):
    """RETOUCH fluid segmentation (IRF = 1, SRF = 2, PED = 3) from the challenge's MetaImage layout.

    Args:
        root: folder of case folders (or of vendor set folders holding case folders).
        batch_size, num_workers, seed, eval_batch_size: see :class:`BaseDataModule` (evaluation batches
            are whole B-scans: keep ``eval_batch_size`` small).
        cache_dir: where preprocessed volumes go (default :func:`default_cache_dir`).
        vendor_map: case name -> vendor (Cirrus, Spectralis, Topcon); wins over ``vendor_pattern``.
        vendor_pattern: regular expression finding the vendor in a case's path below ``root``
            (group 1 if it has groups, else the whole match).
        histogram_reference: vendor whose pooled grey-level histogram the other vendors are matched to;
            ``None`` switches histogram matching off.
        intensity_percentiles: grey values mapped to 0 and 255 before matching.
        median_size: odd median filter size per B-scan (1 disables).
        roi_downsample, roi_smoothing, roi_levels, roi_background_percentile, roi_entropy_radius,
            roi_closing_radius: ROI extraction, see :func:`retina_roi`.
        patch_size: training patch ``[height, width]`` in pixels (rows, columns of a B-scan).
        positive_fraction: share of each epoch's patches that are centred on fluid.
        balance_fluids: draw positive patches evenly over the fluid classes present.
        patches_per_epoch: patches per training epoch (default: one per training B-scan).
        val_fraction, test_fraction: share of labelled cases per vendor for validation / test.
        val_cases, test_cases: explicit case names (override the fractions; may overlap each other,
            never training).
        augment: horizontal flips and brightness/contrast changes of training patches.
        pad_to: whole B-scans are padded to a multiple of this (the network's stride).
        predict_root: another folder of cases to predict (matched to this dataset's reference
            histogram). Without it, ``predict`` takes the cases without ``reference.mhd``, or the test
            cases when every case is labelled.
        cache_mb: memory per loader process for the candidate patch centres of each training B-scan
            (see :class:`~octlightning.data.base.SampleCache`; 0 finds them again for every patch).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int | None = None,
        seed: int = 42,
        eval_batch_size: int | None = 4,
        cache_dir: str | None = None,
        vendor_map: dict[str, str] | None = None,
        vendor_pattern: str | None = DEFAULT_VENDOR_PATTERN,
        histogram_reference: str | None = "Spectralis",
        intensity_percentiles: tuple[float, float] = (0.5, 99.5),
        median_size: int = 3,
        roi_downsample: int = 4,
        roi_smoothing: float = 1.5,
        roi_levels: int = 16,
        roi_background_percentile: float = 50.0,
        roi_entropy_radius: int = 4,
        roi_closing_radius: int = 4,
        patch_size: tuple[int, int] = (256, 128),
        positive_fraction: float = 0.5,
        balance_fluids: bool = True,
        patches_per_epoch: int | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        val_cases: list[str] | None = None,
        test_cases: list[str] | None = None,
        augment: bool = True,
        pad_to: int = 16,
        predict_root: str | None = None,
        cache_mb: float = 1024,
    ) -> None:
        super().__init__(root, batch_size, num_workers, seed, eval_batch_size)
        self.save_hyperparameters()
        if histogram_reference is not None and histogram_reference not in VENDORS:
            raise ValueError(f"histogram_reference must be one of {VENDORS} or null, got {histogram_reference!r}")
        self.settings = PreprocessSettings(
            histogram_reference=histogram_reference,
            intensity_percentiles=(float(intensity_percentiles[0]), float(intensity_percentiles[1])),
            median_size=median_size,
            roi_downsample=roi_downsample,
            roi_smoothing=roi_smoothing,
            roi_levels=roi_levels,
            roi_background_percentile=roi_background_percentile,
            roi_entropy_radius=roi_entropy_radius,
            roi_closing_radius=roi_closing_radius,
        )
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(Path(root))
        self.vendor_map = dict(vendor_map or {})
        self.vendor_pattern = vendor_pattern
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.positive_fraction = positive_fraction
        self.balance_fluids = balance_fluids
        self.patches_per_epoch = patches_per_epoch
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.val_cases = val_cases
        self.test_cases = test_cases
        self.augment = augment
        self.pad_to = pad_to
        self.predict_root = predict_root
        self.cache = SampleCache(cache_mb)
        self._store: VolumeStore | None = None
        self._predict_store: VolumeStore | None = None

    # ----------------------------------------------------------------- cache
    def cases(self, root: str | None = None) -> list[RetouchCase]:
        return find_cases(Path(root or self.root), self.vendor_map, self.vendor_pattern)

    def store(self) -> VolumeStore:
        """The preprocessed dataset (built on first use, reused while settings and files are unchanged)."""
        if self._store is None:
            self._store = VolumeStore(build_cache(self.cases(), self.settings, self.cache_dir))
        return self._store

    def predict_store(self) -> VolumeStore:
        """The preprocessed ``predict_root`` cases, matched to this dataset's reference histogram."""
        if self._predict_store is None:
            reference = self.store().reference_hist if self.settings.histogram_reference else None
            cases = self.cases(self.predict_root)
            self._predict_store = VolumeStore(build_cache(cases, self.settings, self.cache_dir, reference))
        return self._predict_store

    def prepare_data(self) -> None:
        # Runs once per node before setup on every rank: the cache is built here, read in setup.
        self.store()
        if self.predict_root:
            self.predict_store()

    # ----------------------------------------------------------------- splits
    def split(self) -> dict[str, list[str]]:
        """``train``/``val``/``test`` case names: by case, stratified by vendor, seeded."""
        store = self.store()
        labelled = [c for c in store.cases.values() if c.labelled]
        names = {c.name for c in labelled}
        for key, chosen in (("val_cases", self.val_cases), ("test_cases", self.test_cases)):
            unknown = sorted(set(chosen or []) - names)
            if unknown:
                raise DataError(
                    f"{key} {unknown} are not labelled cases of {self.root} (labelled: {sorted(names)[:20]})"
                )
        fixed = set(self.val_cases or []) | set(self.test_cases or [])
        parts: dict[str, list[str]] = {
            "train": [],
            "val": list(self.val_cases or []),
            "test": list(self.test_cases or []),
        }
        drawn = [
            (p, f)
            for p, f, given in (
                ("val", self.val_fraction, self.val_cases),
                ("test", self.test_fraction, self.test_cases),
            )
            if given is None and f > 0
        ]
        for vendor in VENDORS:
            pool = sorted(c.name for c in labelled if c.vendor == vendor and c.name not in fixed)
            if not pool:
                continue
            if not drawn:
                parts["train"] += pool
                continue
            try:
                idx = split_indices(pool, [f for _, f in drawn], self.seed)
            except DataError as err:
                raise DataError(f"{vendor} cases {pool}: {err}") from None
            parts["train"] += [pool[i] for i in idx[0]]
            for (part, _), sel in zip(drawn, idx[1:], strict=True):
                parts[part] += [pool[i] for i in sel]
        return {k: sorted(v) for k, v in parts.items()}

    # ----------------------------------------------------------------- stages
    def setup(self, stage: str) -> None:
        store = self.store()
        parts = self.split()
        if stage in ("fit", "validate"):
            if not parts["val"]:
                raise DataError(f"{self.root}: no validation cases; set val_fraction > 0 or val_cases")
            self.val_set = RetouchSliceDataset(store, parts["val"])
        if stage == "fit":
            if not parts["train"]:
                raise DataError(f"{self.root}: no labelled training cases left after the validation/test split")
            n_slices = sum(store.cases[c].shape[0] for c in parts["train"])
            transform = segmentation_augmentation(
                hflip=0.5 if self.augment else 0,
                brightness_contrast=0.5 if self.augment else 0,
                extra_masks=("fov",),
            )
            self.train_set = RetouchPatchDataset(
                store,
                parts["train"],
                self.patch_size,
                self.positive_fraction,
                self.patches_per_epoch or n_slices,
                transform,
                self.balance_fluids,
                self.cache,
            )
        if stage == "test":
            if not parts["test"]:
                raise DataError(
                    f"{self.root}: no test cases; set test_fraction > 0 or test_cases "
                    f"(cases without reference.mhd cannot be scored: use predict)"
                )
            self.test_set = RetouchSliceDataset(store, parts["test"])
        if stage == "predict":
            if self.predict_root:
                pstore = self.predict_store()
                cases = sorted(pstore.cases)
            else:
                pstore = store
                cases = sorted(c.name for c in store.cases.values() if not c.labelled) or parts["test"]
            if not cases:
                raise DataError(
                    f"{self.root}: nothing to predict: no case without reference.mhd, no test cases; "
                    f"set predict_root, test_cases or test_fraction"
                )
            self.predict_set = RetouchSliceDataset(pstore, cases)

    def collate_fn(self, train: bool):
        return None if train else make_pad_collate(self.pad_to, ("image", "mask"))
