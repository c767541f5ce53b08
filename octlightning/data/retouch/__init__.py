"""RETOUCH OCT fluid segmentation (IRF, SRF, PED) from the challenge's MetaImage volumes.

- :mod:`.cases`: case folders in the challenge layout, vendors, reading one case;
- :mod:`.preprocess`: intensity scaling, histogram matching, median filter, retina ROI, the cache;
- :mod:`.datasets`: whole-B-scan and training-patch datasets over the cache;
- :mod:`.datamodule`: :class:`RetouchDataModule` (``class_path: octlightning.data.retouch.RetouchDataModule``).

MetaImage reading and writing live in :mod:`octlightning.data.formats.metaimage`.
"""

from octlightning.data.retouch.cases import FLUIDS, VENDORS, RetouchCase, find_cases, read_case, resolve_vendor
from octlightning.data.retouch.datamodule import RetouchDataModule
from octlightning.data.retouch.datasets import (
    RetouchPatchDataset,
    RetouchSliceDataset,
    crop_centred,
    fluid_window_counts,
)
from octlightning.data.retouch.preprocess import (
    PreprocessSettings,
    VolumeStore,
    build_cache,
    default_cache_dir,
    retina_roi,
)

__all__ = [
    "FLUIDS",
    "VENDORS",
    "PreprocessSettings",
    "RetouchCase",
    "RetouchDataModule",
    "RetouchPatchDataset",
    "RetouchSliceDataset",
    "VolumeStore",
    "build_cache",
    "crop_centred",
    "default_cache_dir",
    "find_cases",
    "fluid_window_counts",
    "read_case",
    "resolve_vendor",
    "retina_roi",
]
