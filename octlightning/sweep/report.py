"""The report: ``leaderboard.{csv,md,png}`` ranking a sweep's runs, and the Comet upload of their archives.

Each run is ranked by the best value of its own monitored validation metric (``model.init_args.monitor``
and ``monitor_mode`` in its ``config.yaml``; ``val/dice``, max by default) read from its ``metrics.csv``;
runs without a value come last. Test metrics (``test/*``) get a column each.

A sweep over a DataModule's ``fold`` (k-fold cross-validation) also gets ``cross_validation.csv`` and a
section of ``leaderboard.md``: per setting of the other swept keys, the mean and sample standard deviation
over its folds of each test metric and of the best monitored value, and how many folds have them.
"""

from __future__ import annotations

import csv
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from octlightning.sweep.launch import read_status
from octlightning.sweep.spec import format_value, labels

DEFAULT_MONITOR = ("val/dice", "max")


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def run_monitor(run_dir: Path) -> tuple[str, str]:
    """The monitored metric and mode from the run's ``config.yaml`` (default ``val/dice``, max)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        init_args = (config.get("model") or {}).get("init_args") or {}
    except (OSError, yaml.YAMLError, AttributeError):  # no or odd config: the defaults
        init_args = {}
    return str(init_args.get("monitor") or DEFAULT_MONITOR[0]), str(init_args.get("monitor_mode") or DEFAULT_MONITOR[1])


def collect(folder: Path) -> list[dict[str, Any]]:
    """One row per run folder of a sweep: overrides, best monitored value and epoch, test metrics."""
    rows = []
    for status_file in sorted(folder.glob("*/status.json")):
        run_dir = status_file.parent
        status = read_status(run_dir)
        monitor, mode = run_monitor(run_dir)
        best = best_epoch = None
        epochs = 0
        test: dict[str, float] = {}
        try:
            with open(run_dir / "metrics.csv", newline="") as fh:
                for record in csv.DictReader(fh):
                    epoch = _float(record.get("epoch"))
                    if epoch is not None:
                        epochs = max(epochs, int(epoch) + 1)
                    value = _float(record.get(monitor))
                    if value is not None and (best is None or (value > best if mode == "max" else value < best)):
                        best, best_epoch = value, None if epoch is None else int(epoch)
                    for key, text in record.items():
                        if key and key.startswith("test/") and _float(text) is not None:
                            test[key] = _float(text)
        except FileNotFoundError:
            pass
        rows.append(
            {
                "run": run_dir.name,
                "state": status.get("state", "unknown"),
                "overrides": status.get("overrides", {}),
                "monitor": monitor,
                "mode": mode,
                "best": best,
                "best_epoch": best_epoch,
                "epochs": epochs,
                "test": test,
            }
        )

    def order(row: dict[str, Any]) -> tuple[bool, float]:
        if row["best"] is None:
            return True, 0.0  # unscored runs last
        return False, -row["best"] if row["mode"] == "max" else row["best"]

    return sorted(rows, key=order)


def write_leaderboard(folder: Path) -> Path | None:
    """``leaderboard.csv``, ``leaderboard.md`` and ``leaderboard.png`` in the sweep folder; ``None`` if no runs."""
    rows = collect(folder)
    if not rows:
        return None
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    tests = sorted({k for r in rows for k in r["test"]})
    names = labels(keys)

    header = ["rank", "run", "state", *keys, "monitor", "best", "best_epoch", "epochs", *tests]
    table = []
    for rank, r in enumerate(rows, 1):
        table.append(
            [
                rank,
                r["run"],
                r["state"],
                *(format_value(r["overrides"][k]) if k in r["overrides"] else "" for k in keys),
                f"{r['monitor']} ({r['mode']})",
                "" if r["best"] is None else f"{r['best']:.6g}",
                "" if r["best_epoch"] is None else r["best_epoch"],
                r["epochs"],
                *(f"{r['test'][k]:.6g}" if k in r["test"] else "" for k in tests),
            ]
        )
    csv_path = folder / "leaderboard.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(table)

    md_header = [*header[:3], *(names[k] for k in keys), *header[3 + len(keys) :]]
    md = [
        f"# Sweep {folder.name}: {len(rows)} runs, best {rows[0]['monitor']} first",
        "",
        *_markdown(md_header, table),
    ]
    md += _write_cross_validation(folder, rows, keys, tests, names)
    (folder / "leaderboard.md").write_text("\n".join(md))
    _plot(folder / "leaderboard.png", rows, keys, names)
    return csv_path


def _markdown(header: list[str], table: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in line) + " |" for line in table),
        "",
    ]


def _mean_sd(values: list[float]) -> tuple[str, str]:
    mean = statistics.fmean(values) if values else None
    sd = statistics.stdev(values) if len(values) > 1 else None
    return ("" if mean is None else f"{mean:.6g}"), ("" if sd is None else f"{sd:.6g}")


def _write_cross_validation(
    folder: Path, rows: list[dict[str, Any]], keys: list[str], tests: list[str], names: dict[str, str]
) -> list[str]:
    """``cross_validation.csv`` when the sweep varies a ``fold`` key: per setting of the other keys, the
    folds' mean and standard deviation of each test metric and of the best monitored value. Returns its
    markdown section (empty without a fold key)."""
    fold_keys = [k for k in keys if k.rsplit(".", 1)[-1] == "fold"]
    if not fold_keys:
        return []
    others = [k for k in keys if k not in fold_keys]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        setting = tuple(format_value(r["overrides"][k]) if k in r["overrides"] else "" for k in others)
        groups.setdefault(setting, []).append(r)
    header = [*others, "folds", "monitor"]
    for metric in ["best", *tests]:
        header += [f"{metric} mean", f"{metric} sd", f"{metric} folds"]
    table = []
    for setting, members in groups.items():
        line: list[Any] = [*setting, len(members), f"{members[0]['monitor']} ({members[0]['mode']})"]
        for metric in ["best", *tests]:
            values = [r["best"] if metric == "best" else r["test"].get(metric) for r in members]
            values = [v for v in values if v is not None]
            line += [*_mean_sd(values), len(values)]
        table.append(line)
    with open(folder / "cross_validation.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(table)
    md_header = [names[k] for k in others] + header[len(others) :]
    return [
        f"## Cross-validation: mean and standard deviation over the folds ({', '.join(fold_keys)})",
        "",
        *_markdown(md_header, table),
    ]


def _plot(path: Path, rows: list[dict[str, Any]], keys: list[str], names: dict[str, str]) -> None:
    """Best monitored value against each swept hyperparameter (Agg canvas, no display, no pyplot state)."""
    from matplotlib.figure import Figure

    scored = [r for r in rows if r["best"] is not None]
    swept = [k for k in keys if len({format_value(r["overrides"].get(k)) for r in rows}) > 1] or [None]
    fig = Figure(figsize=(3.6 * len(swept), 3.2), layout="constrained")
    axes = fig.subplots(1, len(swept), squeeze=False)[0]
    monitor = rows[0]["monitor"]
    for ax, key in zip(axes, swept, strict=True):
        ys = [r["best"] for r in scored]
        if key is None:
            ax.scatter(range(len(scored)), ys)
            ax.set_xlabel("run (rank order)")
        else:
            values = [r["overrides"].get(key) for r in scored]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric:
                ax.scatter(values, ys)
                if values and min(values) > 0 and max(values) / min(values) >= 20:
                    ax.set_xscale("log")
            else:
                categories = sorted({format_value(v) for v in values})
                ax.scatter([categories.index(format_value(v)) for v in values], ys)
                ax.set_xticks(range(len(categories)), categories, rotation=30)
            ax.set_xlabel(names[key])
        ax.set_ylabel(f"best {monitor}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{path.parent.name} ({len(scored)} of {len(rows)} runs scored)")
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------- Comet upload
def upload(folder: Path, dry_run: bool = False) -> int:
    """``comet upload`` over every run's offline archive in the sweep folder (or print the command)."""
    archives = sorted(str(p) for p in folder.glob("*/*.zip"))
    if not archives:
        print(f"sweep: no Comet offline archives (*.zip) in the run folders of {folder}")
        return 0
    comet = Path(sys.executable).with_name("comet")
    program = [str(comet)] if comet.is_file() else [sys.executable, "-m", "comet_ml.scripts.comet"]
    cmd = [*program, "upload", *archives]
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    if not os.environ.get("COMET_API_KEY"):
        print("sweep: COMET_API_KEY is not set; comet upload needs it (or ~/.comet.config)", flush=True)
    return subprocess.run(cmd).returncode
