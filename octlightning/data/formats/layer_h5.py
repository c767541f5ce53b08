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

Splits (optional): a group ``splits`` holding 1-D integer datasets ``train``, ``val`` and (optionally)
``test``: 0-based B-scan indices (along the ``N`` axis), disjoint. A file that carries the split its
authors published this way is trained and scored on that split (:class:`LayerFileIndex.file_splits`).

Axis order: files written from MATLAB (or by scripts that keep MATLAB's order) store ``images`` as
``(H, W, N)`` and layer maps as ``(L, W, N)`` or ``(N, L, W)``. Readers take the order as a string of the
axis letters (``image_axes``: ``N``, ``H``, ``W``; ``layer_axes``: ``N``, ``W``, ``L``; default
``NHW`` and ``NWL``); :func:`read_along_n` returns samples in the default order whatever the stored one.
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
    if path.is_dir():
        raise DataError(f"{path}: is a folder; this layout reads one HDF5 file (images, layer_maps)")
    if not path.is_file():
        raise DataError(f"{path}: HDF5 file not found")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: cannot open as HDF5 ({err})") from err


def require_dataset(
    f: h5py.File, path: Path, key: str, ndim: int, what: str, option: str | None = None
) -> h5py.Dataset:
    """Dataset ``key`` of the open file ``f`` with ``ndim`` dimensions; :class:`DataError` naming
    ``path``, the key, ``what`` it should hold and the ``option`` that names another dataset otherwise."""
    if key not in f or not isinstance(f[key], h5py.Dataset):
        fix = f"; set {option} to the right one" if option else ""
        raise DataError(f"{path}: no dataset {key!r} ({what}); the file has {sorted(f.keys())}{fix}")
    ds = f[key]
    if ds.ndim != ndim:
        raise DataError(f"{path}: dataset {key!r} has shape {ds.shape}, expected {ndim} dimensions ({what})")
    return ds


IMAGE_AXES = "NHW"
LAYER_AXES = "NWL"
AXES_HINT = (
    "files from MATLAB store images as (H, W, N) and layer maps as (L, W, N) or (N, L, W): "
    "set image_axes (e.g. HWN) and layer_axes (e.g. LWN or NLW) to the file's axis order"
)


def check_axes(axes: str, default: str, option: str) -> str:
    """``axes`` upper-cased when it is an order of ``default``'s letters; ValueError naming ``option`` else."""
    order = str(axes).upper()
    if sorted(order) != sorted(default):
        raise ValueError(f"{option} {axes!r} must be an order of the letters {default!r} (e.g. {default!r})")
    return order


def axis_sizes(ds: h5py.Dataset, axes: str) -> dict[str, int]:
    """``{letter: size}`` of a dataset stored in ``axes`` order."""
    return dict(zip(axes, ds.shape, strict=True))


def read_along_n(ds: h5py.Dataset, index: int | slice, axes: str, default: str) -> np.ndarray:
    """Sample ``index`` (an int: one sample; a slice: a block, ``N`` first) of a dataset stored in
    ``axes`` order, returned in ``default`` order (``NHW`` images: ``(H, W)``; ``NWL`` maps: ``(W, L)``)."""
    if axes == default:
        return ds[index]
    arr = ds[tuple(index if a == "N" else slice(None) for a in axes)]
    kept = [a for a in axes if a != "N" or isinstance(index, slice)]
    return np.transpose(arr, [kept.index(a) for a in default if a in kept])


def fitting_axes(image_shape: tuple[int, ...], layer_shape: tuple[int, ...]) -> str:
    """`` (these shapes fit image_axes: X, layer_axes: Y)``: the most plausible axis orders under which
    an image and a layer-map dataset agree on N and W; empty when no order fits.

    Plausible first: an order left at its default (a Duke AMD export keeps ``(N, W, L)`` maps beside
    ``(H, W, N)`` images), then L being the layer map's smallest axis (a few boundaries, hundreds of
    columns).
    """
    from itertools import permutations

    fits = []
    for ia in ("".join(p) for p in permutations(IMAGE_AXES)):
        isz = dict(zip(ia, image_shape, strict=True))
        for la in ("".join(p) for p in permutations(LAYER_AXES)):
            lsz = dict(zip(la, layer_shape, strict=True))
            if isz["N"] == lsz["N"] and isz["W"] == lsz["W"]:
                changed = (ia != IMAGE_AXES) + (la != LAYER_AXES)
                fits.append((changed + 2 * (lsz["L"] != min(layer_shape)), ia, la))
    if not fits:
        return ""
    _, ia, la = min(fits)
    return f" (these shapes fit image_axes: {ia}, layer_axes: {la})"


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
    datasets: list[str] | None = None  # every dataset and group name at the file's top level
    file_splits: dict[str, np.ndarray] | None = None  # the file's own ``splits`` group, when it has one
    image_axes: str = IMAGE_AXES
    layer_axes: str = LAYER_AXES


def inspect_layer_file(
    path: Path,
    image_key: str,
    layer_key: str | None,
    layer_indices: Sequence[int] | None,
    subject_key: str | None,
    require_layers: bool = True,
    block: int = 64,
    image_axes: str = IMAGE_AXES,
    layer_axes: str = LAYER_AXES,
) -> LayerFileIndex:
    """Validate the file's layout and find the annotated samples, reading ``layer_maps`` block-wise.

    With ``require_layers=False`` a file without ``layer_key`` is accepted (images to predict).
    ``layer_indices`` ``None`` chooses the first and the last boundary. Raises :class:`DataError`
    naming the file and the dataset for a missing dataset, a wrong rank, dtype or shape, infinite
    boundary rows, rows outside the image, a subject id that is not UTF-8 text or a malformed
    ``splits`` group. ``image_axes``/``layer_axes`` give the stored axis order (module docstring);
    every shape error says how to set them.
    """
    image_axes = check_axes(image_axes, IMAGE_AXES, "image_axes")
    layer_axes = check_axes(layer_axes, LAYER_AXES, "layer_axes")
    with open_layer_file(path) as f:
        images = require_dataset(f, path, image_key, 3, f"B-scans, axes {image_axes}", "image_key")
        sizes = axis_sizes(images, image_axes)
        n, h, w = sizes["N"], sizes["H"], sizes["W"]
        if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
            raise DataError(f"{path}: dataset {image_key!r} has dtype {images.dtype}, expected integers or floats")
        layers = None
        if layer_key is not None and (require_layers or layer_key in f):
            layers = require_dataset(f, path, layer_key, 3, f"boundary rows, axes {layer_axes}", "layer_key")
            if not (np.issubdtype(layers.dtype, np.integer) or np.issubdtype(layers.dtype, np.floating)):
                raise DataError(
                    f"{path}: dataset {layer_key!r} has dtype {layers.dtype}, expected boundary rows as numbers "
                    f"(floats, NaN where unannotated)"
                )
            lsizes = axis_sizes(layers, layer_axes)
            shapes = (
                f"{image_key!r} has shape {images.shape} read as {image_axes} (N={n}, H={h}, W={w}), "
                f"{layer_key!r} has shape {layers.shape} read as {layer_axes} (N={lsizes['N']}, W={lsizes['W']}, "
                f"L={lsizes['L']})"
            )
            if lsizes["N"] != n or lsizes["W"] != w:
                problem = "their numbers of B-scans (N) differ" if lsizes["N"] != n else "their widths (W) differ"
                raise DataError(f"{path}: {shapes}: {problem}; {AXES_HINT}{fitting_axes(images.shape, layers.shape)}")
        index = LayerFileIndex(
            path, n, h, w, labelled=np.zeros(n, dtype=bool), datasets=sorted(f.keys()),
            image_axes=image_axes, layer_axes=layer_axes,
        )  # fmt: skip
        if layers is not None:
            num = index.num_boundaries = lsizes["L"]
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
                part = read_along_n(layers, slice(start, start + block), layer_axes, LAYER_AXES)
                part = part[..., chosen].astype(np.float64)
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
            subjects = require_dataset(f, path, subject_key, 1, "subject per B-scan (N,)", "subject_key")[()]
            if len(subjects) != n:
                raise DataError(f"{path}: {subject_key!r} has {len(subjects)} entries for {n} B-scans")
            try:
                index.subjects = np.array([s.decode() if isinstance(s, bytes) else s for s in subjects])
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: dataset {subject_key!r} holds a subject id that is not UTF-8 text ({err})"
                ) from None
        if "splits" in f:
            index.file_splits = read_file_splits(f, path, n)
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


def read_file_splits(f: h5py.File, path: Path, n: int) -> dict[str, np.ndarray]:
    """The file's ``splits`` group as ``{"train", "val", "test": sorted int64 indices}`` (an absent
    ``test`` is empty); :class:`DataError` naming the file for anything else than disjoint, in-range,
    1-D integer index arrays with a ``train`` and a ``val`` part."""
    group = f["splits"]
    if not isinstance(group, h5py.Group):
        raise DataError(f"{path}: 'splits' must be a group holding train, val (and test) index datasets")
    unknown = sorted(set(group.keys()) - {"train", "val", "test"})
    missing = [k for k in ("train", "val") if k not in group]
    if unknown or missing:
        raise DataError(
            f"{path}: the 'splits' group holds {sorted(group.keys())}; expected train, val and optionally test "
            f"(0-based B-scan indices)"
        )
    parts: dict[str, np.ndarray] = {}
    for name in ("train", "val", "test"):
        if name not in group:
            parts[name] = np.zeros(0, dtype=np.int64)
            continue
        values = np.asarray(group[name][()])
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise DataError(
                f"{path}: splits/{name} has shape {values.shape}, dtype {values.dtype}; expected 1-D integers"
            )
        if values.size and (values.min() < 0 or values.max() >= n):
            raise DataError(f"{path}: splits/{name} holds indices outside 0..{n - 1} (0-based B-scan indices)")
        if len(np.unique(values)) != len(values):
            raise DataError(f"{path}: splits/{name} lists a B-scan more than once")
        parts[name] = np.sort(values.astype(np.int64))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = np.intersect1d(parts[a], parts[b])
        if shared.size:
            raise DataError(
                f"{path}: splits/{a} and splits/{b} share B-scans {shared[:10].tolist()}; they must be disjoint"
            )
    return parts


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
    splits: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """Write an HDF5 layer file (layout in the module docstring); ``None`` arrays are left out.

    ``images`` ``(N, H, W)``, ``layer_maps`` ``(N, W, L)`` float rows (NaN = unannotated),
    ``subject``/``bscan_index`` ``(N,)``, ``fluid_masks`` ``(N, H, W)``; ``extra`` adds datasets under
    other names (e.g. the Duke AMD ``layerMaps``); ``splits`` writes the ``splits`` group
    (``{"train": [...], "val": [...], "test": [...]}``, 0-based B-scan indices). Arrays of three
    dimensions are chunked one B-scan per chunk, the access pattern of the readers. The arrays are
    written as given, not validated: :func:`inspect_layer_file` checks a file on read (tests write
    broken files through this on purpose). Returns ``path``.
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
        for name, values in (splits or {}).items():
            f.create_dataset(f"splits/{name}", data=np.asarray(values, dtype=np.int64))
        if boundary_names is not None:
            f.attrs["boundary_names"] = json.dumps(list(boundary_names))
        if pixel_spacing_um is not None:
            f.attrs["pixel_spacing_um"] = pixel_spacing_um
    return path
