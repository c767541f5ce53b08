"""Score a folder of predicted class maps against reference masks: Dice, IoU and HD95 per class.

``python -m octlightning.evaluate <pred_dir> <gt_dir> --info INFO.json --out scores.csv``
``python -m octlightning.evaluate <model>/preds <gt_dir> --protocol mirage --out results.csv``

``gt_dir`` is a folder of reference class maps (a MIRAGE ``semseg/`` folder, or a split folder holding
one); ``INFO.json`` maps their intensities to classes (default: found next to ``gt_dir`` or above it).
Predictions are matched by name: ``<name>.png``, ``<name>_mask.png`` (what ``octlightning predict``
writes) or ``<name>_pred.png`` (the MIRAGE scripts). By default they hold class indices, as
``octlightning predict`` writes them; ``--pred-format value`` reads INFO.json intensities instead.

The CSV has one row per image and a final ``mean`` row. When names carry a volume id
(``<volume>_<slice>``), ``<out>_volumes.csv`` scores each volume from its summed pixel counts, with
the mean HD95 of its slices (:func:`octlightning.metrics.score_volumes`, shared with the test step).
Unannotated reference pixels (INFO.json ``Invalid`` entries) are skipped. The scores are those of the
test step (:mod:`octlightning.metrics`): a class absent from both reference and prediction is NaN and
skipped by the means (nnU-Net's convention); HD95 is in pixels (``hd95_px``), or in the units of
``--spacing`` (``--spacing-unit mm`` or ``um``: column ``hd95_mm`` / ``hd95_um``).

``--protocol mirage`` reproduces MIRAGE's published evaluation (``run_seg_eval.py`` of
github.com/j-morano/MIRAGE) exactly instead: predictions ``<name>_pred.png`` holding INFO.json values
(what ``octlightning predict`` writes with :class:`~octlightning.callbacks.WriteMiragePredictions`),
volumes from the name up to its last underscore, one row per (volume, foreground class) with ``ID``,
``Class``, ``Dice``, ``IoU``, ``HD95`` (:func:`octlightning.metrics.mirage_volume_scores`: an absent
class scores 0, HD95 in pixels), and the mean of those rows. Background-like classes (``background``,
``above ilm``, and ``bg`` unless ``--keep-bg``) and ``invalid`` entries are not scored, as in MIRAGE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from octlightning.data.formats.mirage import DEFAULT_VOLUME_PATTERN, SemSegInfo, read_info, read_value_mask, volume_ids
from octlightning.data.io import list_images
from octlightning.errors import DataError
from octlightning.metrics import (
    SliceCounts,
    confusion_counts,
    hd95_column,
    hd95_per_class,
    mean_row,
    mirage_volume_scores,
    score_row,
    score_volumes,
)

PRED_SUFFIXES = ("", "_mask", "_pred")


def _folders(pred_dir: str | Path, gt_dir: str | Path) -> tuple[Path, Path]:
    """The prediction folder and the reference masks' folder (``<gt_dir>/semseg`` where it exists).

    Raises:
        DataError: either folder is missing.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if (gt_dir / "semseg").is_dir():
        gt_dir = gt_dir / "semseg"
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "reference")):
        if not folder.is_dir():
            raise DataError(f"{folder}: {what} folder not found")
    return pred_dir, gt_dir


def find_info(gt_dir: Path) -> Path:
    """``INFO.json`` in ``gt_dir`` or one of its two parents (``<dataset>/<split>/semseg``)."""
    for folder in (gt_dir, gt_dir.parent, gt_dir.parent.parent):
        if (folder / "INFO.json").is_file():
            return folder / "INFO.json"
    raise DataError(f"{gt_dir}: no INFO.json here or in the two folders above; pass --info")


def _prediction_path(pred_dir: Path, name: str) -> Path | None:
    for suffix in PRED_SUFFIXES:
        path = pred_dir / f"{name}{suffix}.png"
        if path.is_file():
            return path
    return None


def read_prediction(path: Path, info: SemSegInfo, pred_format: str) -> np.ndarray:
    """A predicted class map as class indices, checked against the classes of ``info``."""
    raw = read_value_mask(path)
    if pred_format == "value":
        labels, valid = info.to_labels(raw, path)
        if not valid.all():
            raise DataError(f"{path}: prediction marks pixels as unannotated ({info.ignore_values}); predict a class")
        return labels
    if raw.size and int(raw.max()) >= info.num_classes:
        raise DataError(
            f"{path}: class index {int(raw.max())} but {info.path} has {info.num_classes} classes; "
            "if the file holds INFO.json intensities, use --pred-format value"
        )
    return raw.astype(np.int64)


def evaluate(
    pred_dir: str | Path,
    gt_dir: str | Path,
    info_path: str | Path | None = None,
    pred_format: str = "index",
    volume_pattern: str | None = DEFAULT_VOLUME_PATTERN,
    spacing: float | tuple[float, float] | None = None,
    spacing_unit: str = "mm",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-image rows and per-volume rows (empty without volume ids), each ending with a ``mean`` row.

    ``spacing`` is the pixel size (one value, or ``(row, column)``) in ``spacing_unit`` (``mm``/``um``);
    without it HD95 is in pixels. The columns are those of the test step's tables.
    """
    unit = "px" if spacing is None else spacing_unit
    hd95_column(unit)  # an unknown unit fails before any file is read
    pred_dir, gt_dir = _folders(pred_dir, gt_dir)
    info = read_info(info_path if info_path is not None else find_info(gt_dir))
    refs = list_images(gt_dir, (".png",))
    if not refs:
        raise DataError(f"{gt_dir}: no reference class maps (*.png)")
    preds = {r.stem: _prediction_path(pred_dir, r.stem) for r in refs}
    missing = [n for n, p in preds.items() if p is None]
    if missing:
        raise DataError(
            f"{pred_dir}: no prediction for {len(missing)} of {len(refs)} references, e.g. "
            f"{missing[:5]} (expected <name>.png, <name>_mask.png or <name>_pred.png)"
        )
    names = [r.stem for r in refs]
    volumes = volume_ids(names, volume_pattern, gt_dir)
    k = info.num_classes
    class_names = info.foreground_names
    rows: list[dict[str, Any]] = []
    slices: list[SliceCounts] = []
    for ref_path, name, volume in zip(refs, names, volumes, strict=True):
        target, valid = info.to_labels(read_value_mask(ref_path), ref_path)
        pred_path = preds[name]
        pred = read_prediction(pred_path, info, pred_format)  # type: ignore[arg-type]
        if pred.shape != target.shape:
            raise DataError(
                f"{pred_path}: prediction is {pred.shape[::-1]} but {ref_path} is {target.shape[::-1]} (W x H)"
            )
        counts = confusion_counts(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(valid), k)
        hd95 = hd95_per_class(pred, target, k, valid, spacing)
        row: dict[str, Any] = {"id": name}
        if volume is not None:
            row["volume"] = volume
            slices.append(SliceCounts(volume, counts, hd95))
        row.update(score_row(counts, class_names, hd95, unit))
        rows.append(row)
    volume_rows = score_volumes(slices, class_names, unit)
    if volume_rows:
        volume_rows.append(mean_row(volume_rows, "volume"))
    rows.append(mean_row(rows, "id"))
    return rows, volume_rows


def mirage_classes(info_path: Path, ignore_bg: bool = True) -> tuple[dict[int, str], list[int]]:
    """MIRAGE's choice of scored classes from ``INFO.json``: ``({value: label} of the foreground, invalid values)``.

    As ``run_seg_eval.py``: a label containing ``invalid`` marks unannotated pixels; labels containing
    ``background`` or ``above ilm`` (and ``bg`` when ``ignore_bg``) are not scored.
    """
    try:
        entries = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{info_path}: cannot read INFO.json ({err})") from err
    labels = {int(v["value"]): str(v["label"]) for v in entries.values()}
    invalid = [v for v, lab in labels.items() if "invalid" in lab.lower()]
    foreground = {
        v: lab
        for v, lab in labels.items()
        if v not in invalid
        and not ((ignore_bg and "bg" in lab.lower()) or "background" in lab.lower() or "above ilm" in lab.lower())
    }
    return foreground, invalid


def evaluate_mirage(
    pred_dir: str | Path, gt_dir: str | Path, info_path: str | Path | None = None, ignore_bg: bool = True
) -> list[dict[str, Any]]:
    """MIRAGE's published protocol: one row per (volume, foreground class), then a ``mean`` row.

    ``gt_dir`` holds the reference intensity maps ``<volume>_<slice>.png``; ``pred_dir`` the predictions
    ``<volume>_<slice>_pred.png`` in INFO.json intensities. A prediction of another size than its
    reference is resized to it by nearest neighbour (``skimage.transform.resize(order=0)``), as MIRAGE does.
    """
    from skimage.transform import resize

    pred_dir, gt_dir = _folders(pred_dir, gt_dir)
    info = Path(info_path) if info_path is not None else find_info(gt_dir)
    foreground, invalid = mirage_classes(info, ignore_bg)
    volumes: dict[str, dict[int, Path]] = {}
    for ref in list_images(gt_dir, (".png",)):
        cut = ref.stem.rfind("_")
        if cut < 0 or not ref.stem[cut + 1 :].isdigit():
            raise DataError(f"{ref}: MIRAGE names B-scans <volume>_<slice number>.png")
        volumes.setdefault(ref.stem[:cut], {})[int(ref.stem[cut + 1 :])] = ref
    if not volumes:
        raise DataError(f"{gt_dir}: no reference class maps (*.png)")
    rows: list[dict[str, Any]] = []
    for volume in sorted(volumes):
        refs = [volumes[volume][z] for z in sorted(volumes[volume])]
        missing = [r.stem for r in refs if not (pred_dir / f"{r.stem}_pred.png").is_file()]
        if missing:
            raise DataError(f"{pred_dir}: no MIRAGE prediction <name>_pred.png for {missing[:5]}")
        gt = np.array([read_value_mask(r) for r in refs])
        pred = np.array([read_value_mask(pred_dir / f"{r.stem}_pred.png") for r in refs])
        if pred.shape != gt.shape:
            pred = resize(pred, gt.shape, order=0, preserve_range=True)
        for value, label in foreground.items():
            rows.append({"ID": volume, "Class": label, **mirage_volume_scores(pred, gt, value, invalid)})
    rows.append(
        {"ID": "mean", "Class": "all", **{k: float(np.mean([r[k] for r in rows])) for k in ("Dice", "IoU", "HD95")}}
    )
    return rows


def _spacing(values: list[float] | None) -> float | tuple[float, float] | None:
    if not values:
        return None
    if len(values) > 2:
        raise SystemExit("error: --spacing takes one value (isotropic) or two (rows, columns)")
    return values[0] if len(values) == 1 else (values[0], values[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m octlightning.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("pred_dir", help="folder of predicted class maps")
    parser.add_argument("gt_dir", help="folder of reference class maps (semseg/ or the split folder holding it)")
    parser.add_argument("--info", default=None, help="INFO.json (default: next to gt_dir or above it)")
    parser.add_argument("--out", default="scores.csv", help="per-image CSV (volumes go to <out>_volumes.csv)")
    parser.add_argument(
        "--protocol",
        choices=("octlightning", "mirage"),
        default="octlightning",
        help="octlightning: per image and per volume, absent classes NaN; mirage: MIRAGE's run_seg_eval.py exactly",
    )
    parser.add_argument(
        "--pred-format", choices=("index", "value"), default="index", help="predictions hold class indices or values"
    )
    parser.add_argument("--volume-pattern", default=DEFAULT_VOLUME_PATTERN, help="regex, group 1 = volume id")
    parser.add_argument("--no-volumes", action="store_true", help="do not score volumes")
    parser.add_argument(
        "--spacing", type=float, nargs="+", default=None, help="pixel size for HD95: one value or (rows, cols)"
    )
    parser.add_argument("--spacing-unit", choices=("mm", "um"), default="mm", help="unit of --spacing")
    parser.add_argument("--keep-bg", action="store_true", help="mirage: also score classes named bg")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.protocol == "mirage":
            mirage_rows = evaluate_mirage(args.pred_dir, args.gt_dir, args.info, not args.keep_bg)
        else:
            rows, volume_rows = evaluate(
                args.pred_dir,
                args.gt_dir,
                args.info,
                args.pred_format,
                None if args.no_volumes else args.volume_pattern,
                _spacing(args.spacing),
                args.spacing_unit,
            )
    except DataError as err:
        sys.exit(f"error: {err}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.protocol == "mirage":
        pd.DataFrame(mirage_rows).to_csv(out, index=False)
        mean = mirage_rows[-1]
        print(f"MIRAGE protocol, {len(mirage_rows) - 1} (volume, class) rows:")
        print(f"  Dice: {mean['Dice'] * 100:.2f}\n  IoU: {mean['IoU'] * 100:.2f}\n  HD95: {mean['HD95']:.2f}")
        print(f"wrote {out}")
        return
    pd.DataFrame(rows).to_csv(out, index=False)
    summary = rows[-1]
    hd95 = hd95_column("px" if args.spacing is None else args.spacing_unit)
    print(f"{len(rows) - 1} images: dice {summary['dice']:.4f}  iou {summary['iou']:.4f}  {hd95} {summary[hd95]:.2f}")
    print(f"wrote {out}")
    if volume_rows:
        vol_out = out.with_name(f"{out.stem}_volumes.csv")
        pd.DataFrame(volume_rows).to_csv(vol_out, index=False)
        print(f"{len(volume_rows) - 1} volumes: dice {volume_rows[-1]['dice']:.4f}; wrote {vol_out}")


if __name__ == "__main__":
    main()
