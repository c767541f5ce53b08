"""``octlightning check-data --config ...``: validate a dataset and summarise it, without training.

Runs the DataModule's own validation (the same checks ``fit`` runs before the first step) for the
training, validation and test splits, then reads every sample once and prints what a researcher
checks before a long run: sample counts, tensor sizes, label values and NaN fractions, and what the
model will be given from the data (input channels, class or boundary names, output width). Like nnU-Net's
dataset integrity check it goes on after a problem: every split is set up and every sample read, and
all the broken files are reported together (each as one line naming the file, no traceback), with exit
status 1. A split whose set-up fails (a folder missing, an unmatched file) is reported by its first
problem, as the DataModule raises it, and its samples are not read.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import defaultdict
from typing import Any

import torch

from octlightning.errors import ConfigError, DataError
from octlightning.links import DATA_DETERMINES, DATA_SUGGESTS

SPLITS = (("fit", "train_set", "train"), ("fit", "val_set", "val"), ("test", "test_set", "test"))
# How DataModules say a dataset has no test split (not a problem); a broken file whose path merely
# contains "test" (ISIC2018_Task1-2_Test_Input/...) is one.
NO_TEST_SPLIT = re.compile(r"\bno test\b|test split is empty|test_fraction")
# Keys whose integer values are labels worth listing.
LABEL_KEYS = ("mask", "fov", "labels", "target")


def summarize_dataset(dataset: Any, problems: list[DataError] | None = None) -> dict[str, Any]:
    """Count samples and describe each tensor key: shapes, dtype, value range, labels, NaN fraction.

    A sample that raises :class:`DataError` is appended to ``problems`` and skipped (without
    ``problems`` the error propagates).
    """
    stats: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"shapes": set(), "min": float("inf"), "max": float("-inf"), "nan": 0, "numel": 0, "values": set()}
    )
    n = 0
    for i in range(len(dataset)):
        try:
            sample = dataset[i]
        except DataError as err:
            if problems is None:
                raise
            problems.append(err)
            continue
        n += 1
        for key, value in sample.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or key == "size":
                continue
            s = stats[key]
            s["shapes"].add(tuple(value.shape))
            s["dtype"] = str(value.dtype).removeprefix("torch.")
            v = value.float()
            finite = v[torch.isfinite(v)]
            s["nan"] += int(torch.isnan(v).sum())
            s["numel"] += v.numel()
            if finite.numel():
                s["min"] = min(s["min"], float(finite.min()))
                s["max"] = max(s["max"], float(finite.max()))
            if key in LABEL_KEYS and len(s["values"]) <= 32:
                s["values"].update(torch.unique(finite).tolist())
    # A dataset whose samples are not files (random training patches) says what they are drawn from.
    describe = getattr(dataset, "describe", None)
    return {"samples": n, "tensors": dict(stats), "about": describe() if callable(describe) else None}


def format_summary(split: str, summary: dict[str, Any]) -> list[str]:
    about = f" ({summary['about']})" if summary.get("about") else ""
    lines = [f"{split}: {summary['samples']} samples{about}"]
    for key, s in summary["tensors"].items():
        shapes = sorted(s["shapes"])
        shape_text = str(shapes[0]) if len(shapes) == 1 else f"{len(shapes)} shapes, {shapes[0]} .. {shapes[-1]}"
        line = f"  {key:<12} {s.get('dtype', '?'):<8} {shape_text}  range [{s['min']:.4g}, {s['max']:.4g}]"
        if s["nan"]:
            line += f"  NaN {s['nan'] / max(1, s['numel']):.1%}"
        if s["values"]:
            values = sorted(s["values"])
            line += f"  values {values[:12]}{' ...' if len(values) > 12 else ''}"
        lines.append(line)
    return lines


def model_lines(dm: Any) -> list[str]:
    """What ``fit`` links from this data into the model (:data:`octlightning.links.DATA_DETERMINES`:
    channels, classes and their names, boundaries, output width; and the training patch), one
    ``name value`` per line; attributes the DataModule leaves ``None`` are left out. Read after
    ``setup`` (class names can come from the files)."""
    names = [*DATA_DETERMINES, *DATA_SUGGESTS.values()]
    values = {name: getattr(dm, name, None) for name in names}
    return ["model gets:"] + [f"  {name:<15} {value}" for name, value in values.items() if value is not None]


def check_datamodule(dm: Any) -> list[str]:
    """Set up every split the DataModule offers and summarise it, reading every sample.

    Returns the summary lines. Raises:
        DataError: after every split was tried: the one problem found, or all of them (one line each,
            ``<split>: <message naming the file>``) when there are several.
    """
    lines: list[str] = []
    problems: list[tuple[str, DataError]] = []
    set_up: dict[str, bool] = {}
    for stage, attr, name in SPLITS:
        if stage not in set_up:
            try:
                dm.setup(stage)
                set_up[stage] = True
            except DataError as err:
                set_up[stage] = False
                if stage == "test" and NO_TEST_SPLIT.search(str(err)):
                    lines.append(f"test: not available ({err})")
                else:
                    problems.append(("train/val" if stage == "fit" else name, err))
        if not set_up[stage]:
            continue
        dataset = getattr(dm, attr, None)
        if dataset is not None:
            found: list[DataError] = []
            lines += format_summary(name, summarize_dataset(dataset, found))
            problems += [(name, err) for err in found]
    unique = list({str(err): (split, err) for split, err in problems}.values())  # patches repeat an image
    if len(unique) == 1:
        raise unique[0][1]
    if unique:
        listing = "\n".join(f"  {split}: {err}" for split, err in unique)
        raise DataError(f"{len(unique)} problems in the dataset:\n{listing}") from unique[0][1]
    return lines


def main(argv: list[str]) -> int:
    """Parse the config like ``fit`` does and check its data (no trainer is built, nothing is trained)."""
    from octlightning.cli import OctLightningCLI

    class _DataOnlyCLI(OctLightningCLI):
        # Only the DataModule is built: checking data needs no model (nor its pretrained weights).
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            self.datamodule = self.instantiate_datamodule()

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # argv is ours to pass
            cli = _DataOnlyCLI(args=argv, run=False)  # builds the DataModule, which checks its arguments
        lines = check_datamodule(cli.datamodule)
    except (DataError, ConfigError, FileNotFoundError) as err:
        print(f"check-data: FAILED: {err}", file=sys.stderr)
        return 1
    print(f"check-data: {type(cli.datamodule).__name__} at {cli.datamodule.root}: OK")
    print("\n".join(lines + model_lines(cli.datamodule)))
    return 0
