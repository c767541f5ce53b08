"""MetaImage (``.mhd`` header + ``.raw``/``.zraw`` data file): reading with checks, writing with geometry.

SimpleITK does the decoding and encoding; it is imported inside the functions that use it, so an
environment without it (a GPU image) still imports every octlightning module.

Arrays are in SimpleITK's numpy order ``(z, y, x)`` = ``(slices, rows, columns)`` for an OCT volume
(B-scans, A-scan depth, A-scans); geometry is in MetaImage/ITK order ``(x, y, z)``: ``spacing`` in mm,
``origin`` in mm, ``direction`` the 3 x 3 direction cosines, row-major (ITK's ``GetDirection``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from octlightning.data.io import shown_path
from octlightning.errors import DataError

ELEMENT_BYTES = {
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
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Geometry:
    """Where a 3-D volume's voxels lie in space, in ITK order ``(x, y, z)``.

    Attributes:
        spacing: voxel size in mm, ``(x, y, z)``.
        origin: position of voxel ``(0, 0, 0)`` in mm.
        direction: 9 direction cosines, row-major 3 x 3 (identity for most OCT exports).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY


def read_header(path: Path) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header, up to ``ElementDataFile`` (binary data may follow)."""
    header = {}
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            if "=" in line:
                key, value = line.split("=", 1)
                header[key.strip()] = value.strip()
                if key.strip() == "ElementDataFile":
                    break
    return header


def data_files(path: Path) -> list[Path]:
    """The header and its existing separate data file (what a cache fingerprint must cover)."""
    data = read_header(path).get("ElementDataFile")
    files = [path]
    if data and data != "LOCAL" and (path.parent / data).is_file():
        files.append(path.parent / data)
    return files


def _check_data_file(path: Path, header: dict[str, str], label: str) -> None:
    """Fail early, with a clear message, when the data file is missing or shorter than the header says."""
    data = header.get("ElementDataFile")
    if data is None:
        raise DataError(f"{label}: {path} has no ElementDataFile line; not a MetaImage header")
    if data == "LOCAL" or data.startswith("LIST") or "%" in data:
        return  # data inside the header file, or a file list: SimpleITK checks these
    data_path = path.parent / data
    if not data_path.is_file():
        raise DataError(f"{label}: {path} names data file {data}, which does not exist ({data_path})")
    size = data_path.stat().st_size
    if header.get("CompressedData", "False").lower() == "true":
        expected = int(header.get("CompressedDataSize", "0") or 0)
        if expected and size < expected:
            raise DataError(
                f"{label}: {data_path} is {size} bytes but {path.name} declares CompressedDataSize = {expected}; "
                f"the file is truncated"
            )
        return
    element = ELEMENT_BYTES.get(header.get("ElementType", ""))
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
        channels = int(header.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return
    if element and dims:
        expected = int(np.prod(dims)) * element * channels
        if size < expected:
            raise DataError(
                f"{label}: {data_path} is {size} bytes but {path.name} declares {' x '.join(map(str, dims))} "
                f"{header['ElementType']} voxels = {expected} bytes; the file is truncated"
            )


def read_metaimage(path: Path, label: str) -> tuple[np.ndarray, Geometry]:
    """A 3-D grey MetaImage as a ``(z, y, x)`` array (the file's dtype) and its :class:`Geometry`.

    ``label`` (e.g. the case name) starts every error message. Raises :class:`DataError` when the
    header is missing, empty, not 3-D, names a missing or truncated data file, holds more than one
    channel or NaN/inf voxels, or when SimpleITK cannot decode it.
    """
    import SimpleITK as sitk

    if not path.is_file():
        raise DataError(f"{label}: {path} not found")
    if path.stat().st_size == 0:
        raise DataError(f"{label}: {path} is empty (0 bytes); not a MetaImage header")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        # SimpleITK's C++ side aborts the whole process on such a path instead of raising.
        raise DataError(f"{label}: {shown_path(path)}: the path is not valid UTF-8; rename the folder") from None
    header = read_header(path)
    if header.get("NDims", "3") != "3":
        raise DataError(f"{label}: {path} has NDims = {header.get('NDims')}; an OCT volume has 3 dimensions")
    _check_data_file(path, header, label)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = " ".join(str(err).split())[-300:]
        raise DataError(f"{label}: SimpleITK cannot read {path} ({reason})") from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{label}: {path} has {image.GetNumberOfComponentsPerPixel()} channels; expected grey values")
    geometry = Geometry(
        tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
        tuple(float(s) for s in image.GetOrigin()),  # type: ignore[arg-type]
        tuple(float(s) for s in image.GetDirection()),
    )
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise DataError(f"{label}: {path} holds {bad} NaN/inf voxels ({bad / array.size:.2%}); expected finite")
    return array, geometry


def write_metaimage(array: np.ndarray, path: Path, geometry: Geometry, compress: bool = False) -> Path:
    """Write a ``(z, y, x)`` array as ``path`` (``.mhd``) + data file, with the given geometry.

    Give a prediction the :class:`Geometry` its source image was read with, and it overlays that
    image in 3D Slicer or ITK-SNAP. ``compress`` writes a zlib ``.zraw`` instead of a plain ``.raw``.
    The dtype is kept (``uint8`` labels stay ``MET_UCHAR``). Parent folders are created.
    """
    import SimpleITK as sitk

    if array.ndim != 3:
        raise ValueError(f"write_metaimage: expected a (z, y, x) array, got shape {array.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in geometry.spacing])
    image.SetOrigin([float(s) for s in geometry.origin])
    image.SetDirection([float(s) for s in geometry.direction])
    os.makedirs(path.parent, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path
