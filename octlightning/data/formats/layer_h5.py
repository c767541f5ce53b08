"""The HDF5 layer-boundary file: B-scans and, per A-scan column, the row of each retinal boundary.

Datasets (names configurable on read; the Duke AMD export calls the first two ``images``/``layerMaps``):

- ``images`` ``(N, H, W)``: grayscale B-scans, integers (white = dtype maximum) or floats in [0, 1].
- ``layer_maps`` ``(N, W, L)``: the row (y, pixels, 0..H) of boundary ``l`` in column ``x``, NaN where
  a grader left it unannotated; boundaries in anatomical order (top first: ILM ... BM).
- ``subject`` ``(N,)`` (optional): subject/eye id per B-scan, integers or UTF-8 text, for splits.
- ``bscan_index`` ``(N,)`` (optional): the B-scan's index within its volume.
- ``fluid_masks`` ``(N, H, W)`` (optional): non-zero where fluid is.

Attributes (optional): ``pixel_spacing_um`` (axial micrometres per pixel), ``boundary_names`` (JSON
list of ``L`` names). :func:`inspect_layer_file` validates a file; :func:`write_layer_file` writes one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from octlightning.errors import DataError


def open_layer_file(path: Path) -> h5py.File:
    """Open ``path`` for reading; :class:`DataError` naming it when it is missing or not HDF5."""
    if not path.is_file():
        raise DataError(f"{path}: HDF5 file not found")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: cannot open as HDF5 ({err})") from err


def require_dataset(f: h5py.File, path: Path, key: str, ndim: int, what: str) -> h5py.Dataset:
    """Dataset ``key`` of the open file ``f`` with ``ndim`` dimensions; :class:`DataError` naming
    ``path``, the key and ``what`` it should hold otherwise."""
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{path}: no dataset {key!r} ({what}); the file has {sorted(f.keys())}")
    ds = f[key]
    if ds.ndim != ndim:
        raise DataError(f"{path}: dataset {key!r} has shape {ds.shape}, expected {ndim} dimensions ({what})")
    return ds


@dataclass
class LayerFileIndex:
    """What :func:`inspect_layer_file` learns from a file (``num_boundaries`` is None without layers)."""

    path: Path
    n: int
    height: int
    width: int
    num_boundaries: int | None = None
    layer_indices: list[int] | None = None  # the chosen boundaries, defaults resolved
    subjects: np.ndarray | None = None
    spacing_um: float | None = None
    boundary_names: list[str] | None = None  # the file's names of all L boundaries (attribute), if any
    labelled: np.ndarray | None = None  # (N,) bool: a chosen boundary has at least one annotated column


def inspect_layer_file(
    path: Path,
    image_key: str,
    layer_key: str | None,
    layer_indices: Sequence[int] | None,
    subject_key: str | None,
    require_layers: bool = True,
    block: int = 64,
) -> LayerFileIndex:
    """Validate the file's layout and find the annotated samples, reading ``layer_maps`` block-wise.

    With ``require_layers=False`` a file without ``layer_key`` is accepted (images to predict).
    ``layer_indices`` ``None`` chooses the first and the last boundary. Raises :class:`DataError`
    naming the file and the dataset for a missing dataset, a wrong rank, dtype or shape, infinite
    boundary rows, rows outside the image, or a subject id that is not UTF-8 text.
    """
    with open_layer_file(path) as f:
        images = require_dataset(f, path, image_key, 3, "B-scans (N, H, W)")
        n, h, w = images.shape
        if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
            raise DataError(f"{path}: dataset {image_key!r} has dtype {images.dtype}, expected integers or floats")
        layers = None
        if layer_key is not None and (require_layers or layer_key in f):
            layers = require_dataset(f, path, layer_key, 3, "boundary rows (N, W, L)")
            if not (np.issubdtype(layers.dtype, np.integer) or np.issubdtype(layers.dtype, np.floating)):
                raise DataError(
                    f"{path}: dataset {layer_key!r} has dtype {layers.dtype}, expected boundary rows as numbers "
                    f"(floats, NaN where unannotated)"
                )
            if layers.shape[0] != n:
                raise DataError(
                    f"{path}: {image_key!r} holds {n} B-scans but {layer_key!r} holds {layers.shape[0]}; "
                    f"they must have the same length"
                )
            if layers.shape[1] != w:
                hint = " (is it stored as (N, L, W)?)" if layers.shape[2] == w else ""
                raise DataError(
                    f"{path}: {layer_key!r} has shape {layers.shape}, expected (N, W, L) with W = {w}, the width "
                    f"of {image_key!r}{hint}"
                )
        index = LayerFileIndex(path, n, h, w, labelled=np.zeros(n, dtype=bool))
        if layers is not None:
            num = index.num_boundaries = layers.shape[2]
            # Default: first and last boundary, ILM and Bruch's membrane in the Duke exports.
            chosen = ([0, num - 1] if num > 1 else [0]) if layer_indices is None else list(layer_indices)
            bad = [k for k in chosen if not 0 <= k < num]
            if bad or not chosen:
                raise DataError(
                    f"{path}: layer_indices {chosen} out of range for {layer_key!r}, which has {num} boundaries "
                    f"(valid indices 0..{num - 1})"
                )
            index.layer_indices = chosen
            for start in range(0, n, block):
                part = layers[start : start + block][..., chosen].astype(np.float64)
                if np.isinf(part).any():
                    i = start + int(np.flatnonzero(np.isinf(part).any(axis=(1, 2)))[0])
                    raise DataError(f"{path}: {layer_key!r}[{i}] holds infinite values; use NaN for unannotated")
                out = np.isfinite(part) & ((part < 0) | (part > h))
                if out.any():
                    i = start + int(np.flatnonzero(out.any(axis=(1, 2)))[0])
                    raise DataError(
                        f"{path}: {layer_key!r}[{i}] holds rows outside the image (0..{h}); boundary values "
                        f"must be row indices of {image_key!r}"
                    )
                index.labelled[start : start + len(part)] = np.isfinite(part).any(axis=(1, 2))
        if subject_key is not None and subject_key in f:
            subjects = require_dataset(f, path, subject_key, 1, "subject per B-scan (N,)")[()]
            if len(subjects) != n:
                raise DataError(f"{path}: {subject_key!r} has {len(subjects)} entries for {n} B-scans")
            try:
                index.subjects = np.array([s.decode() if isinstance(s, bytes) else s for s in subjects])
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: dataset {subject_key!r} holds a subject id that is not UTF-8 text ({err})"
                ) from None
        spacing = f.attrs.get("pixel_spacing_um")
        if spacing is not None:
            index.spacing_um = float(np.asarray(spacing).reshape(-1)[0])
        names = f.attrs.get("boundary_names")
        if names is not None and index.num_boundaries is not None:
            try:
                names = json.loads(names) if isinstance(names, (str, bytes)) else [str(n) for n in names]
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: attribute boundary_names is not a JSON list of names ({err})") from None
            if not isinstance(names, list) or len(names) != index.num_boundaries:
                raise DataError(
                    f"{path}: attribute boundary_names {names!r} does not name the {index.num_boundaries} "
                    f"boundaries of {layer_key!r}"
                )
            index.boundary_names = [str(n) for n in names]
    return index


def write_layer_file(
    path: str | Path,
    images: np.ndarray,
    layer_maps: np.ndarray | None = None,
    *,
    subject: np.ndarray | None = None,
    bscan_index: np.ndarray | None = None,
    fluid_masks: np.ndarray | None = None,
    boundary_names: Sequence[str] | None = None,
    pixel_spacing_um: float | None = None,
    extra: Mapping[str, np.ndarray | None] | None = None,
) -> Path:
    """Write an HDF5 layer file (layout in the module docstring); ``None`` arrays are left out.

    ``images`` ``(N, H, W)``, ``layer_maps`` ``(N, W, L)`` float rows (NaN = unannotated),
    ``subject``/``bscan_index`` ``(N,)``, ``fluid_masks`` ``(N, H, W)``; ``extra`` adds datasets under
    other names (e.g. the Duke AMD ``layerMaps``). Arrays of three dimensions are chunked one B-scan
    per chunk, the access pattern of the readers. The arrays are written as given, not validated:
    :func:`inspect_layer_file` checks a file on read (tests write broken files through this on
    purpose). Returns ``path``.
    """
    path = Path(path)
    datasets = {
        "images": images,
        "layer_maps": layer_maps,
        "subject": subject,
        "bscan_index": bscan_index,
        "fluid_masks": fluid_masks,
        **(extra or {}),
    }
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            if value is None:
                continue
            value = np.asarray(value)
            f.create_dataset(key, data=value, chunks=(1, *value.shape[1:]) if value.ndim == 3 else None)
        if boundary_names is not None:
            f.attrs["boundary_names"] = json.dumps(list(boundary_names))
        if pixel_spacing_um is not None:
            f.attrs["pixel_spacing_um"] = pixel_spacing_um
    return path
