"""RETOUCH preprocessing and its on-disk cache: intensity scaling, histogram matching, median filter,
retina ROI, per-case statistics, built once per dataset and settings and read back memory-mapped.

Per volume:

1. intensities scaled to [0, 255] between robust percentiles (Spectralis ships 16-bit, the others 8-bit);
2. histogram matching to the pooled histogram of the ``histogram_reference`` vendor's volumes;
3. median filtering (speckle);
4. a retina ROI per B-scan (entropy of a smoothed, background-clipped, coarsely quantised B-scan,
   Otsu threshold, morphological closing, holes filled, largest component; reference fluid always
   included);
5. the mean/std of the ROI intensities, used to standardise the network input.

The cache lives in a folder named by a fingerprint of the settings and of the source files (size,
modification time) below ``cache_dir`` (default :func:`default_cache_dir`, in the user's cache folder,
never in the dataset's own folder, which is often shared or read-only), so changing a setting or a file
builds a new cache and an unchanged dataset reuses it. Besides the arrays it holds ``meta.json``
(per-case shape, geometry, statistics) and ``index.csv`` (case, vendor, slice, presence of IRF/SRF/PED
per B-scan).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.filters.rank import entropy
from skimage.morphology import disk

from octlightning.data.formats.metaimage import IDENTITY, Geometry, data_files, read_metaimage
from octlightning.data.retouch.cases import FLUIDS, RetouchCase, read_case
from octlightning.errors import DataError

# Bump when the preprocessing code changes what it writes: every cache is rebuilt.
# 2: meta.json keeps each volume's origin and direction (prediction volumes copy them).
PREPROCESS_VERSION = 2


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
    files = data_files(case.oct_path)
    if case.reference_path is not None:
        files += data_files(case.reference_path)
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


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/octlightning`` (default ``~/.cache/octlightning``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "octlightning"


def default_cache_dir(root: Path) -> Path:
    """``<user cache>/retouch/<root name>-<hash of root's absolute path>``: one folder per dataset,
    outside it (a dataset folder is often shared or read-only)."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return user_cache_dir() / "retouch" / f"{root.resolve().name}-{digest}"


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
    volume, labels, geometry = read_case(case)
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
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
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
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.spacing))

    @property
    def geometry(self) -> Geometry:
        """The source ``oct.mhd``'s spacing, origin and direction (ITK order)."""
        return Geometry(self.spacing, self.origin, self.direction)


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
                tuple(m["origin"]),
                tuple(m["direction"]),
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
