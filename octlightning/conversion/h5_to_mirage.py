"""Converter: HDF5 layer file (boundaries, fluid) -> MIRAGE segmentation layout, split by subject.

``python -m octlightning.convert h5-to-mirage <file.h5> <out_dir>`` (or ``octlightning convert ...``)
reads the HDF5 layer format (:mod:`octlightning.data.formats.layer_h5`: ``images``, ``layer_maps``,
``fluid_masks``, ``subject``, ``bscan_index``) and writes the MIRAGE layout
(:mod:`octlightning.data.formats.mirage`) with one class per layer between boundaries, plus ``Fluid``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from octlightning.data.base import split_indices
from octlightning.data.formats.layer_h5 import open_layer_file
from octlightning.data.formats.mirage import SPLITS, read_info, write_info, write_sample
from octlightning.errors import DataError

HELP = "HDF5 layer file (boundaries, fluid) -> MIRAGE segmentation layout, split by subject"


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
    num_folds: int = 0,
    fold: int = 0,
) -> Path:
    """Write the MIRAGE layout from an HDF5 OCT file, split by subject (seeded).

    Reads ``images`` (N,H,W) uint8, ``layer_maps`` (N,W,L) boundary rows (NaN = unannotated),
    optional ``fluid_masks`` (N,H,W) (non-zero = fluid), ``subject`` (N,) and ``bscan_index`` (N,);
    boundary names from the ``boundary_names`` attribute (JSON list) when present.

    Classes: ``k`` = between boundary ``k-1`` and ``k`` (0 above the first, ``L`` below the last, see
    :func:`layer_class_map`), then ``Fluid`` painted on top of the layers. Pixels whose layer is not
    annotated (NaN boundaries) and that are not fluid get the INFO.json entry ``Invalid`` (value 255),
    which :class:`~octlightning.data.oct_semseg.OCTSemSegDataModule` excludes from losses and metrics. Files are named
    ``subject<SS>_<BBB>.png`` so that each subject is one volume. ``subjects`` converts only those
    subjects (e.g. to hold some out entirely). ``num_folds`` >= 2 makes ``test/`` fold ``fold`` of that
    many seeded folds of the subjects, in place of ``test_fraction`` (one layout per fold, written by one
    call each, cross-validates the foundation recipe; see :func:`~octlightning.data.base.split_indices`).
    Returns ``out_dir``.

    Raises:
        DataError: a dataset missing or of another shape, too few subjects for the parts or folds.
        ValueError: ``fold`` not in ``[0, num_folds)``.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
    """
    h5_path, out = Path(h5_path), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty; choose another or pass overwrite=True (--overwrite)")
    with open_layer_file(h5_path) as fh:
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

        parts = split_indices(all_subjects[keep], [val_fraction, test_fraction], seed, num_folds, fold)
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
            write_sample(out / split_of[i], stem, images[i], info.to_values(labels, valid))
    groups = {s: sorted({int(all_subjects[i]) for i in keep[idx]}) for s, idx in zip(SPLITS, parts, strict=True)}
    (out / "split.json").write_text(
        json.dumps(
            {"source": str(h5_path), "seed": seed, "num_folds": num_folds, "fold": fold, "subjects": groups}, indent=2
        )
        + "\n"
    )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of :func:`run`."""
    parser.add_argument("h5", help="HDF5 file with images, layer_maps, fluid_masks, subject, bscan_index")
    parser.add_argument("out_dir", help="output dataset folder")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of subjects for val/")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of subjects for test/")
    parser.add_argument("--seed", type=int, default=42, help="seed of the subject split")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    parser.add_argument("--subjects", type=int, nargs="+", default=None, help="convert only these subjects")
    parser.add_argument(
        "--num-folds", type=int, default=0, help="k-fold cross-validation: test/ is one fold of the subjects (0: none)"
    )
    parser.add_argument("--fold", type=int, default=0, help="with --num-folds: the fold (0-based) written as test/")


def run(args: argparse.Namespace) -> int:
    """Convert as the parsed ``args`` say; print where the subjects went. Returns the exit status."""
    out = convert_h5(
        args.h5, args.out_dir, args.val_fraction, args.test_fraction, args.seed, args.overwrite, args.subjects,
        args.num_folds, args.fold,
    )  # fmt: skip
    split = json.loads((out / "split.json").read_text())["subjects"]
    print(f"wrote {out} (subjects: {split})")
    return 0
