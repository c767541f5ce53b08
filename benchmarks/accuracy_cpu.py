"""Accuracy on unseen data after a fixed CPU time budget, per recipe: does a change still learn?

For each recipe, ``octlightning fit`` runs with the recipe's hparams file as a user runs it, on the
shared data (../shared/data), on the CPU, for a time budget (``trainer.max_time`` with ``max_epochs: -1``:
a cosine learning-rate schedule then spans the budget, see ``BaseTask.schedule_span``, and has decayed
when it ends, whatever the machine's speed). The budget alone ends a run: the recipe's early stopping is
off unless ``--early-stopping`` (with it, runs stopped at 12-16 of 20 minutes with the schedule at a
third of its peak rate, and their wall time said more about the patience than the recipe). Then
``octlightning test`` scores its ``best.ckpt`` (chosen on the validation split) on the test split. Both
splits are unseen in training: subject-wise for the OCT recipes (Duke DME subjects), image-wise for the
others. Only CPU-sizing overrides are applied (listed per recipe below). The RETOUCH and foundation recipes read the
shared Duke DME file written in their layouts into ``<out>/data`` (subjects 1-8 as RETOUCH cases; the
MIRAGE layout split by subject); without MIRAGE weights offline, the foundation row's frozen encoder is
random (``--foundation-weights FILE`` runs the real recipe). Prints a markdown table (budget, wall time,
epochs/steps, validation and test figures) and writes it to ``runs/accuracy-cpu/accuracy-cpu-<date>.md``.

    python benchmarks/accuracy_cpu.py                         # every recipe whose data is present
    python benchmarks/accuracy_cpu.py --recipes oct           # the OCT layer recipes only
    python benchmarks/accuracy_cpu.py --recipes oct --data-seed 0   # another split (other held-out subjects)
    python benchmarks/accuracy_cpu.py --recipes oct_unet --folds 4  # 4-fold cross-validation: a row per
                                                                    # fold (a budget each) and their mean
    python benchmarks/accuracy_cpu.py --recipes oct_unet --folds 4 --only-folds 0  # rerun fold 0 only
    python benchmarks/accuracy_cpu.py --report runs/accuracy-cpu   # tabulate finished runs again

Run by hand or by ``make accuracy-cpu`` (never in CI: it takes the budgets' sum, 20 minutes per OCT
recipe). A loaded machine gets fewer steps into the budget; the table says how many each got.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclass
class Recipe:
    name: str
    config: str
    data: str  # under the shared data folder; the recipe is skipped when it is absent
    minutes: float
    metrics: list[str]  # logged metric names (without the val/ or test/ prefix) shown in the table
    args: list[str] = field(default_factory=list)  # CPU-sizing overrides
    # writes the recipe's layout from the shared data into a folder and returns the dataset root
    prepare: Callable[[Path, Path], Path] | None = None


def retouch_cases(shared_file: Path, out: Path) -> Path:
    """Duke DME subjects 1-8 of the shared HDF5 as RETOUCH cases in the challenge's Spectralis folder
    (``oct.mhd`` + ``reference.mhd``, fluid as IRF), as ../shared/data/retouch_like holds subjects 1, 2: eight cases
    give the recipe's vendor-stratified split (per vendor 20 % validation, 20 % test) whole cases."""
    import h5py

    from octlightning.data.formats.metaimage import Geometry, write_metaimage

    root = out / "retouch_duke"
    with h5py.File(shared_file, "r") as f:
        subject, images, fluid = f["subject"][:], f["images"], f["fluid_masks"]
        for s in sorted(set(subject.tolist())):
            case = root / "RETOUCH-TrainingSet-Spectralis" / f"TRAIN_DUKE{s:02d}"  # the challenge's folders
            if (case / "reference.mhd").is_file():
                continue
            index = sorted(int(i) for i in (subject == s).nonzero()[0])
            geometry = Geometry(spacing=(0.01133, 0.00387, 0.492))  # mm, as in retouch_like (DATA.md)
            write_metaimage(images[index], case / "oct.mhd", geometry, compress=True)
            write_metaimage((fluid[index] > 0).astype("uint8"), case / "reference.mhd", geometry, compress=True)
    return root


def mirage_layout(shared_file: Path, out: Path) -> Path:
    """The shared HDF5 in the MIRAGE layout (``octlightning convert h5-to-mirage``), split by subject."""
    from octlightning.conversion.h5_to_mirage import convert_h5

    root = out / "duke_dme_semseg"
    if (root / "INFO.json").is_file():
        return root
    return convert_h5(shared_file, root, val_fraction=0.125, test_fraction=0.125)


# the network's output width follows the data's (the CLI links it)
OCT_ARGS = ["--data.init_args.image_size", "256", "--data.init_args.output_width", "256"]
RECIPES = [
    Recipe("oct_segformer", "hparams/oct_segformer.json", "duke_dme/duke_dme_trainval.h5", 20,
           ["mae_px_ILM", "mae_px_BM", "mae_um_ILM", "mae_um_BM"], OCT_ARGS),
    Recipe("oct_unet", "hparams/oct_unet.json", "duke_dme/duke_dme_trainval.h5", 20,
           ["mae_px_ILM", "mae_px_BM", "mae_um_ILM", "mae_um_BM"], OCT_ARGS),
    Recipe("isic_deeplabv3plus", "hparams/isic_deeplabv3plus.json", "ph2_isic", 5,
           ["dice", "iou", "thresholded_jaccard"],  # the ISIC 2018 score: logged by test only
           ["--data.init_args.batch_size", "8"]),
    Recipe("vessel_unet", "hparams/vessel_unet.json", "drive", 20, ["dice", "auroc"],
           ["--model.init_args.net.init_args.base_channels", "16",
            "--data.init_args.patch_size", "128", "--data.init_args.patches_per_image", "4",
            "--data.init_args.batch_size", "8"]),
    Recipe("retouch_unet", "hparams/retouch_unet.json", "duke_dme/duke_dme_trainval.h5", 10, ["dice_IRF"],
           ["--data.init_args.patches_per_epoch", "256", "--data.init_args.batch_size", "16"],
           prepare=retouch_cases),
    # No MIRAGE weights offline: the frozen ViT-B stays random, so this row checks that the pipeline and
    # decoder learn, not the foundation model; give --foundation-weights for the real recipe.
    Recipe("duke_dme_foundation", "hparams/duke_dme_foundation.json", "duke_dme/duke_dme_trainval.h5", 10,
           ["dice", "iou"],  # HD95 per B-scan and class: test/test_metrics.csv
           ["--model.init_args.net.init_args.img_size", "512", "--trainer.check_val_every_n_epoch", "2"],
           prepare=mirage_layout),
]  # fmt: skip
# recipes whose DataModule draws its test split from the data (num_folds, fold): --folds runs them per fold
CROSS_VALIDATED = {"oct_segformer", "oct_unet", "isic_deeplabv3plus", "retouch_unet"}


def run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in ``log``; wall seconds. Raises on failure."""
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.monotonic() - start


def run_name(recipe: Recipe, fold: int | None) -> str:
    """The run's experiment folder under the output root: the recipe's name, ``-fold<i>`` for a fold."""
    return recipe.name if fold is None else f"{recipe.name}-fold{fold}"


def common_args(
    recipe: Recipe,
    data_root: Path,
    root: Path,
    weights: str | None,
    data_seed: int | None,
    early_stopping: bool,
    fold: int | None = None,
    folds: int = 0,
) -> list[str]:
    args = ["--config", recipe.config, "--data.init_args.root", str(data_root),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.default_root_dir", str(root),
            "--comet", "false", "--trainer.enable_progress_bar", "false", "--experiment", run_name(recipe, fold),
            "--trainer.max_epochs", "-1", *recipe.args]  # fmt: skip
    if fold is not None:  # the DataModule's k-fold cross-validation: the test split is this fold
        args += ["--data.init_args.num_folds", str(folds), "--data.init_args.fold", str(fold)]
    if "foundation" in recipe.name:
        args += ["--model.init_args.net.init_args.weights", weights or "null"]
    if data_seed is not None:  # another draw of the recipe's seeded split (other held-out subjects/images)
        args += ["--data.init_args.seed", str(data_seed)]
    if not early_stopping:  # the budget alone ends the run, and its cosine schedule decays to the end
        args += ["--early_stopping_patience", "null"]
    return args


def fit_and_test(
    recipe: Recipe,
    shared: Path,
    root: Path,
    weights: str | None = None,
    data_seed: int | None = None,
    early_stopping: bool = False,
    fold: int | None = None,
    folds: int = 0,
) -> None:
    """``fit`` within the budget into ``<root>/<name>/fit``, then ``test`` its best.ckpt into ``.../test``
    (``<name>``: :func:`run_name`)."""
    folder = root / run_name(recipe, fold)
    folder.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "octlightning"]
    budget = f"00:00:{int(recipe.minutes):02d}:{int(round(recipe.minutes % 1 * 60)):02d}"
    data_root = recipe.prepare(shared / recipe.data, root / "data") if recipe.prepare else shared / recipe.data
    args = common_args(recipe, data_root, root, weights, data_seed, early_stopping, fold, folds)
    wall = run([*base, "fit", *args, "--version", "fit", "--trainer.max_time", budget], folder / "fit.log")
    (folder / "fit" / "wall.json").write_text(json.dumps({"wall_s": wall, "budget_min": recipe.minutes}))
    best = folder / "fit" / "checkpoints" / "best.ckpt"
    try:  # the shared DRIVE set has no test split (its test images are held back): validation only
        run([*base, "test", *args, "--version", "test", "--ckpt_path", str(best)], folder / "test.log")
    except RuntimeError as err:
        print(f"accuracy-cpu: {recipe.name}: no test figures ({err})", flush=True)


def read_metrics(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path))) if path.is_file() else []


def summarise(recipe: Recipe, root: Path, fold: int | None = None) -> dict[str, str]:
    """One table row from ``<root>/<name>/{fit,test}`` (``<name>``: :func:`run_name`)."""
    fit, test = root / run_name(recipe, fold) / "fit", root / run_name(recipe, fold) / "test"
    rows = read_metrics(fit / "metrics.csv")
    # the checkpointed epoch: the task's own monitor and mode, as the run saved them in its config
    task = yaml.safe_load((fit / "config.yaml").read_text())["model"]["init_args"]
    monitor = task["monitor"]
    better = min if task["monitor_mode"] == "min" else max
    val = [r for r in rows if r.get(monitor)]
    best = better(val, key=lambda r: float(r[monitor])) if val else {}
    epochs = max((int(r["epoch"]) for r in rows if r.get("epoch")), default=-1) + 1
    steps = max((int(r["step"]) for r in rows if r.get("step")), default=-1) + 1
    test_rows = read_metrics(test / "metrics.csv")
    tested = {k: v for r in test_rows for k, v in r.items() if v}
    timing = json.loads((fit / "wall.json").read_text()) if (fit / "wall.json").is_file() else {}
    wall, budget = timing.get("wall_s", math.nan), timing.get("budget_min", recipe.minutes)
    out = {
        "recipe": run_name(recipe, fold),
        "held out (val / test)": held_out(root / run_name(recipe, fold) / "fit.log"),
        "budget": f"{budget:g} min",
        "wall": f"{wall / 60:.1f} min" if math.isfinite(wall) else "n/a",
        "epochs / steps": f"{epochs} / {steps}",
        "best epoch": best.get("epoch", "n/a"),
    }
    for m in recipe.metrics:
        v, t = (f"{float(x):.3g}" if x else "n/a" for x in (best.get(f"val/{m}"), tested.get(f"test/{m}")))
        out[m + " (val / test)"] = f"{v} / {t}"
    return out


def held_out(fit_log: Path) -> str:
    """The validation and test subjects (or cases) the fit's split line names, e.g. ``[6] / [1, 4]``."""
    text = fit_log.read_text() if fit_log.is_file() else ""
    found = {k: re.search(rf"\b{k} (\[[^\]]*\])", text) for k in ("val", "test")}
    return " / ".join(m.group(1) if m else "?" for m in found.values())


def fold_mean(recipe: Recipe, rows: list[dict[str, str]]) -> dict[str, str]:
    """The folds' mean (and sample sd) of every ``val / test`` figure: the cross-validation row."""
    out = {key: "" for key in rows[0]}
    out["recipe"] = f"{recipe.name}: mean +- sd of {len(rows)} folds"
    for key in rows[0]:
        if "(val / test)" not in key or key.startswith("held out"):
            continue
        cells = []
        for part in (0, 1):
            values = [float(r[key].split(" / ")[part]) for r in rows if r[key].split(" / ")[part] != "n/a"]
            sd = f" +- {statistics.stdev(values):.2g}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.3g}{sd}" if values else "n/a")
        out[key] = " / ".join(cells)
    return out


def subject_rows(recipe: Recipe, root: Path, folds: int) -> list[dict[str, str]]:
    """Per subject, from each fold's ``test/test_subjects.csv`` (OCT recipes): every subject is tested by
    the one fold that held it out; then the mean over subjects."""
    rows, values = [], {m: [] for m in recipe.metrics}
    for fold in range(folds):
        path = root / run_name(recipe, fold) / "test" / "test_subjects.csv"
        for r in read_metrics(path):
            row = {"recipe": recipe.name, "subject": r["subject"], "fold": str(fold), "B-scans": r["bscans"]}
            for m in recipe.metrics:
                row[m] = f"{float(r[m]):.3g}" if r.get(m) else "n/a"
                if r.get(m):
                    values[m].append(float(r[m]))
            rows.append(row)
    if rows:
        mean = {"recipe": recipe.name, "subject": f"mean +- sd of {len(rows)}", "fold": "", "B-scans": ""}
        for m, v in values.items():
            mean[m] = f"{statistics.fmean(v):.3g} +- {statistics.stdev(v):.2g}" if len(v) > 1 else "n/a"
        rows.append(mean)
    return rows


def table(rows: list[dict[str, str]]) -> str:
    lines: list[str] = []
    last = None
    for row in rows:  # one table per column set (recipes report different metrics)
        head = "| " + " | ".join(row) + " |"
        if head != last:
            lines += ["", head, "|" + "---|" * len(row)]
            last = head
        lines.append("| " + " | ".join(row.values()) + " |")
    return "\n".join(lines).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=None, help="substrings of recipe names to run")
    parser.add_argument("--out", default=str(REPO / "runs" / "accuracy-cpu"))
    parser.add_argument("--shared-data", default=str(SHARED_DATA))
    parser.add_argument("--report", default=None, help="tabulate the runs in this folder without training")
    parser.add_argument("--foundation-weights", default=None, help="local MIRAGE encoder weights (default: random)")
    parser.add_argument(
        "--data-seed", type=int, default=None, help="the DataModules' split seed (default: the recipe's, 42)"
    )
    parser.add_argument(
        "--early-stopping", action="store_true", help="keep the recipes' early stopping (default: the budget alone)"
    )
    parser.add_argument(
        "--folds", type=int, default=0,
        help="k-fold cross-validation: each recipe whose DataModule has num_folds runs once per fold (a budget "
        "each) and gets a mean row; the others are skipped",
    )  # fmt: skip
    parser.add_argument(
        "--only-folds", type=int, nargs="+", default=None,
        help="with --folds: train only these folds (e.g. one that ran beside other load); the table still "
        "covers every fold found in --out",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.only_folds is not None and not all(0 <= k < args.folds for k in args.only_folds):
        parser.error(f"--only-folds {args.only_folds}: each must be in [0, --folds {args.folds})")
    chosen = [r for r in RECIPES if not args.recipes or any(s in r.name for s in args.recipes)]
    root = Path(args.report or args.out).resolve()
    shared = Path(args.shared_data)
    rows: list[dict[str, str]] = []
    per_subject: list[dict[str, str]] = []  # with --folds: each subject's test figures
    for recipe in chosen:
        if args.folds and recipe.name not in CROSS_VALIDATED:
            print(f"accuracy-cpu: {recipe.name}: its DataModule has no num_folds (own test split), skipped")
            continue
        folds: list[int | None] = list(range(args.folds)) if args.folds else [None]
        done = []
        for fold in folds:
            name = run_name(recipe, fold)
            if args.report is None and (args.only_folds is None or fold in args.only_folds):
                if not (shared / recipe.data).exists():
                    print(f"accuracy-cpu: {recipe.name}: {shared / recipe.data} not found, skipped", flush=True)
                    break
                print(f"accuracy-cpu: {name}: fit for {recipe.minutes:g} min, then test", flush=True)
                fit_and_test(
                    recipe, shared, root, args.foundation_weights, args.data_seed, args.early_stopping, fold, args.folds
                )
            if (root / name / "fit").is_dir():
                done.append(summarise(recipe, root, fold))
        rows += done
        if args.folds and done:
            rows.append(fold_mean(recipe, done))
            per_subject += subject_rows(recipe, root, args.folds)
    text = (
        f"Measured {datetime.date.today()} on the CPU ({os.cpu_count()} cores); validation: the checkpointed "
        f"(best) epoch; test: that checkpoint on the test split. Both unseen in training.\n\n{table(rows)}\n"
    )
    if per_subject:
        text += (
            "\nPer test subject (its fold's test split; errors pooled over the subject's annotated A-scans):\n\n"
            f"{table(per_subject)}\n"
        )
    print(text)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"accuracy-cpu-{datetime.date.today()}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
