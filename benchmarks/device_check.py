"""GPU evidence in one call: throughput, a timed vessel training and an OCT-layer run, one report.

Made for the lent GPU machine (one H200, 16 cores, no network, 10 minutes a command), where a session
gets 15 minutes of device time by chance: one command must bring everything back. Each part runs in a
subprocess of its own with its own time limit (its process group is killed when the limit passes), and
the report is rewritten after every part, so a part that hangs or a command killed at its limit still
returns what finished. Parts, in this order:

    env      two-line environment header (GPU, driver, torch, CUDA, Python, library versions) and an
             import check of every ``hparams/*.json`` recipe (which ones lack a module, and where the
             import happens: SimpleITK is not on the device image)
    bench    ``benchmarks/bench.py`` once per recipe (its own timer each): (a) plain fp32 loop, (b) plain
             best (bf16 + channels_last + compile), (c) ``octlightning fit`` on the real files, c/a, c/b,
             peak GPU memory, and the loader-only images/s; merged into one table
    oct      ``hparams/oct_segformer.json`` on the Duke DME file for a fixed wall-clock budget: validation
             MAE per boundary in px and um over time
    vessel   ``hparams/vessel_unet.json`` on DRIVE (the published batch 4, lr 1e-3, bf16 on a GPU) for the
             time left, up to about 3 minutes (``trainer.max_time``): validation Dice (= F1) and AUROC
             over time, images/s and the per-epoch overhead (steps / validation / the rest)

Output under ``--out`` (default ``$OUT``, else ``runs/device-check``): ``device_check.md`` (the report),
``curves.csv`` (every validation metric and per-epoch timing of the training parts, long format:
part, elapsed_s, epoch, step, metric, value) and ``device_check.log`` (the tail of each part's output).

    make device-check         # on the lent GPU machine (see README "Benchmarks" for the device call)
    make device-rehearsal     # here, on the CPU, in a Python 3.12 copy of the device image, tiny budgets

Without a GPU (or with ``--tiny``) the networks and epochs shrink so that the whole check runs in a few
minutes on 2 cores: that run exists to catch import errors, missing wheels, paths and the report format
before a GPU minute is spent, not to measure anything.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench.py"

# Per-part limits in seconds on the GPU machine: 9 minutes in all with the kit's install (about 15 s)
# included. The vessel run takes what the others leave, up to its budget; its trainer.max_time is its
# budget less START_MARGIN (imports, set-up, the final checkpoint). The bench recipes compile (b), which
# can take most of their minute: a recipe that runs out of time is reported as such, with its log tail.
GPU_BUDGETS = {"env": 60, "bench:vessel": 60, "bench:ISIC": 60, "bench:SegFormer": 50, "bench:MIRAGE": 70,
               "bench:RETOUCH": 50, "oct": 90, "vessel": 230}  # fmt: skip
GPU_TOTAL = 510
# The CPU rehearsal (2 shared cores, tiny networks): generous limits, it only has to finish (each part
# took 10-160 s on the loaded 2-core machine, 8 to 11 minutes in all).
TINY_BUDGETS = {"env": 240, "bench:vessel": 300, "bench:ISIC": 300, "bench:SegFormer": 300, "bench:MIRAGE": 300,
                "bench:RETOUCH": 300, "oct": 180, "vessel": 180}  # fmt: skip
TINY_TOTAL = 2400
START_MARGIN = {"gpu": 35, "tiny": 90}
# A part is skipped when less than this fraction of its budget is left.
MIN_SHARE = 0.5

# Overrides that shrink the training parts for the CPU rehearsal only (trainer and network keys; the
# data keys stay as published). On a GPU the hparams files run as published.
TINY_VESSEL = ["--model.init_args.net.init_args.base_channels", "8", "--model.init_args.net.init_args.depth", "3",
               "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
               "--trainer.check_val_every_n_epoch", "1"]  # fmt: skip
TINY_OCT = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]

CURVE_FIELDS = ["part", "elapsed_s", "epoch", "step", "metric", "value"]


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- child parts
def part_env(args: argparse.Namespace) -> str:
    """Two header lines (hardware, software) and the import check of every recipe."""
    import importlib
    import importlib.metadata as md
    import traceback

    import torch

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "absent"

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
            driver = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"
        except (OSError, subprocess.TimeoutExpired):
            driver = "unknown (no nvidia-smi)"
        hw = (f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
              f"compute capability {p.major}.{p.minor}, driver {driver}, {os.cpu_count()} CPU cores")  # fmt: skip
    else:
        hw = f"GPU: none (CPU only, {os.cpu_count()} cores): a rehearsal, its figures measure nothing"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    libs = ", ".join(f"{name} {version(name)}" for name in (
        "lightning", "torchmetrics", "transformers", "timm", "segmentation-models-pytorch", "albumentations",
        "jsonargparse", "h5py", "numpy", "SimpleITK"))  # fmt: skip
    sw = (f"Software: torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn}), "
          f"Python {platform.python_version()}, {libs}")  # fmt: skip

    rows = []
    for config in sorted((REPO / "hparams").glob("*.json")):
        paths: list[str] = []

        def walk(node, paths=paths):
            if isinstance(node, dict):
                if isinstance(node.get("class_path"), str):
                    paths.append(node["class_path"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(json.loads(config.read_text()))
        status = "ok"
        for class_path in paths:
            module, _, name = class_path.rpartition(".")
            try:
                getattr(importlib.import_module(module), name)
            except Exception as err:  # a missing wheel or module: name it and the file that imports it
                ours = [f for f in traceback.extract_tb(err.__traceback__) if "octlightning" in f.filename]
                where = f" (imported at {Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno})" if ours else ""
                status = f"{type(err).__name__}: {err}{where}"
                break
        rows.append(f"| {config.name} | {status} |")
        # Only the RETOUCH recipes may lack a module, and only SimpleITK (absent from the device image).
        if status != "ok" and not ("retouch" in config.name and "SimpleITK" in status):
            args.failed = True
    return "\n".join([hw, sw, "", "| recipe | imports |", "|---|---|", *rows])


def _fmt_duration(seconds: float) -> str:
    s = max(1, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _train_clock(part: str, curves: Path):
    """A callback timing each training epoch (steps, validation, the rest) and logging validation
    metrics against wall time, appending every row to ``curves`` as it comes."""
    import lightning as L
    import torch

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # each boundary after the GPU's queued work, so durations are real
        return time.perf_counter()

    class TrainClock(L.Callback):
        def __init__(self) -> None:
            self.t0: float | None = None
            self.epochs: list[dict] = []  # per epoch: steps_s, val_s, period_s, samples
            self.vals: list[dict] = []
            self._cur: dict | None = None
            new = not curves.exists()
            self._file = curves.open("a", newline="")
            self._csv = csv.writer(self._file)
            if new:
                self._csv.writerow(CURVE_FIELDS)

        def row(self, trainer, metric: str, value: float) -> None:
            elapsed = time.perf_counter() - (self.t0 or time.perf_counter())
            self._csv.writerow([part, f"{elapsed:.2f}", trainer.current_epoch, trainer.global_step, metric,
                                f"{value:.6g}"])  # fmt: skip
            self._file.flush()

        def _close_epoch(self, trainer, t: float) -> None:
            if self._cur is None:
                return
            e = self._cur
            e["period_s"] = t - e["start"]
            e["other_s"] = e["period_s"] - e["steps_s"] - e["val_s"]
            self.epochs.append(e)
            for key in ("steps_s", "val_s", "other_s"):
                self.row(trainer, f"epoch_{key}", e[key])
            if e["steps_s"] > 0:
                self.row(trainer, "train_images_per_s", e["samples"] / e["steps_s"])
            self._cur = None

        def on_train_start(self, trainer, pl_module):
            self.t0 = now()

        def on_train_epoch_start(self, trainer, pl_module):
            t = now()
            self._close_epoch(trainer, t)  # the period runs to the next epoch's start: checkpoints count
            self._cur = {"epoch": trainer.current_epoch, "start": t, "steps_s": 0.0, "val_s": 0.0, "samples": 0}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._step_t = now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self._cur is not None:
                self._cur["steps_s"] += now() - self._step_t
                self._cur["samples"] += len(batch["image"])

        def on_validation_start(self, trainer, pl_module):
            self._val_t = now()

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            if self._cur is not None:
                self._cur["val_s"] += now() - self._val_t
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            values["elapsed_s"] = time.perf_counter() - (self.t0 or time.perf_counter())
            values["epoch"] = trainer.current_epoch
            self.vals.append(values)
            for key, value in values.items():
                if key.startswith("val/"):
                    self.row(trainer, key, value)

        def on_train_end(self, trainer, pl_module):
            self._close_epoch(trainer, now())
            self.end = time.perf_counter()
            self._file.close()

    return TrainClock()


def _fit(args: argparse.Namespace, part: str, config: str, root: Path, extra: list[str]):
    """The recipe's ``octlightning fit`` (hparams file as published, data root, max_time) with the clock."""
    from octlightning.cli import OctLightningCLI

    max_time = max(5.0, args.limit - args.start_margin)
    cli_args = ["--config", str(REPO / config), "--data.init_args.root", str(root),
                "--trainer.default_root_dir", str(Path(args.work) / "runs"), "--experiment", f"device_check_{part}",
                "--trainer.max_time", _fmt_duration(max_time), *extra]  # fmt: skip
    cli = OctLightningCLI(args=cli_args, run=False)
    clock = _train_clock(part, Path(args.out) / "curves.csv")
    cli.trainer.callbacks.append(clock)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - start
    prec = cli.trainer.precision
    return cli, clock, wall, max_time, prec


def _timing_lines(clock, wall: float, max_time: float, prec: str, batch: int) -> list[str]:
    epochs = clock.epochs
    steps = sum(e["steps_s"] for e in epochs)
    val = sum(e["val_s"] for e in epochs)
    other = sum(e["other_s"] for e in epochs)
    samples = sum(e["samples"] for e in epochs)
    later = epochs[1:] or epochs
    l_steps = sum(e["steps_s"] for e in later)
    l_other = sum(e["other_s"] for e in later)
    lines = [
        f"{len(epochs)} epochs, {samples} training images (batch {batch}, precision {prec}) in {wall:.0f} s of fit "
        f"(trainer.max_time {max_time:.0f} s); {len(clock.vals)} validations.",
        f"Time in epochs: training steps {steps:.1f} s, validation {val:.1f} s, the rest (data waits, logging, "
        f"checkpoints, epoch ends) {other:.1f} s.",
    ]
    if steps > 0:
        lines.append(
            f"Training images/s: {samples / steps:.1f} in the steps alone, {samples / (steps + other):.1f} counting "
            f"the rest, {samples / (steps + other + val):.1f} counting validation too. Per-epoch overhead "
            f"(the rest / steps): {other / steps:.1%} over all epochs, {l_other / max(l_steps, 1e-9):.1%} after the "
            f"first (target <= 10 %); first epoch {epochs[0]['other_s']:.1f} s beside {epochs[0]['steps_s']:.1f} s "
            "of steps (loader workers start). Each step boundary is synchronised with the GPU to time it, which "
            "costs a little throughput against the bench table's (c)."
        )
    return lines


def _curve_table(vals: list[dict], keys: list[str], max_rows: int = 12) -> list[str]:
    if not vals:
        return ["No validation ran within the budget."]
    pick = vals
    if len(vals) > max_rows:  # evenly spaced, first and last included
        pick = [vals[round(i * (len(vals) - 1) / (max_rows - 1))] for i in range(max_rows)]
    lines = ["| elapsed s | epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for v in pick:
        cells = [f"{v[k]:.4g}" if k in v else "-" for k in keys]
        lines.append(f"| {v['elapsed_s']:.0f} | {v['epoch']} | " + " | ".join(cells) + " |")
    if len(vals) > max_rows:
        lines.append(f"({max_rows} of {len(vals)} validations; all of them in curves.csv)")
    return lines


def part_vessel(args: argparse.Namespace) -> str:
    extra = ["--trainer.max_epochs", "-1"]  # constant lr (scheduler none): the time budget ends the run
    if args.tiny:
        extra += TINY_VESSEL
    root = Path(args.data) / "drive"
    cli, clock, wall, max_time, prec = _fit(args, "vessel", "hparams/vessel_unet.json", root, extra)
    dm, model = cli.datamodule, cli.model
    lines = [
        f"`hparams/vessel_unet.json` on `{root}`: lr {model.lr:g}, batch {dm.batch_size}, "
        f"validation every {cli.trainer.check_val_every_n_epoch} epochs, overrides {' '.join(extra)}.",
        "",
        *_timing_lines(clock, wall, max_time, prec, dm.batch_size),
        "",
        *_curve_table(clock.vals, ["val/dice", "val/auroc", "val/sensitivity", "val/loss"]),
    ]
    if clock.vals:
        best = max(clock.vals, key=lambda v: v.get("val/dice", float("-inf")))
        dice, auroc = best.get("val/dice", float("nan")), best.get("val/auroc", float("nan"))
        lines += ["", f"Best validation Dice (= F1) {dice:.4f} (AUROC {auroc:.4f}) at epoch {best['epoch']}, "
                  f"{best['elapsed_s']:.0f} s."]  # fmt: skip
    return "\n".join(lines)


def part_oct(args: argparse.Namespace) -> str:
    extra = TINY_OCT if args.tiny else []
    root = Path(args.data) / "duke_dme" / "duke_dme_trainval.h5"
    cli, clock, wall, max_time, prec = _fit(args, "oct", "hparams/oct_segformer.json", root, list(extra))
    names = list(cli.model.boundary_names)
    lines = [
        f"`hparams/oct_segformer.json` on `{root}` (random initialisation: no pretrained weights on the machine), "
        f"cosine schedule planned for {cli.trainer.max_epochs} epochs, cut by the time budget.",
        "",
        *_timing_lines(clock, wall, max_time, prec, cli.datamodule.batch_size),
        "",
        *_curve_table(clock.vals, ["val/mae_px", "val/mae_um", "val/thickness_mae_um", "val/loss"]),
    ]
    if clock.vals:
        best = min(clock.vals, key=lambda v: v.get("val/mae_px", float("inf")))
        last = clock.vals[-1]
        lines += ["", "| boundary | MAE px (best epoch) | MAE um (best epoch) | MAE px (last) | MAE um (last) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name in [*names, None]:
            px, um = (f"val/mae_px_{name}", f"val/mae_um_{name}") if name else ("val/mae_px", "val/mae_um")
            cells = [f"{v.get(k, float('nan')):.2f}" for v in (best, last) for k in (px, um)]
            lines.append(f"| {name or 'mean'} | " + " | ".join(cells) + " |")
        lines.append(f"Best epoch {best['epoch']} ({best['elapsed_s']:.0f} s); last epoch {last['epoch']}. Pixels of "
                     "the original 496-row B-scan; um with the file's axial spacing.")  # fmt: skip
    return "\n".join(lines)


PARTS = {"env": part_env, "vessel": part_vessel, "oct": part_oct}


# --------------------------------------------------------------------------- orchestration
def run_limited(cmd: list[str], limit: float, log: Path) -> tuple[str, float]:
    """Run ``cmd`` in its own process group, killing the whole group (loader workers, compile workers)
    when ``limit`` seconds pass. Returns (status, wall seconds)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            status = f"timed out at {limit:.0f} s"
    return status, time.perf_counter() - start


def log_tail(log: Path, lines: int) -> str:
    """The last lines of a log, progress-bar redraws reduced to their final state."""
    text = log.read_text(errors="replace") if log.exists() else ""
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(line for line in kept[-lines:])


def merge_bench_tables(files: list[Path]) -> str:
    """One throughput table and one loader table from bench.py's per-recipe markdown files."""
    head, main_rows, loader_rows, main_hdr, loader_hdr = None, [], [], [], []
    for path in files:
        lines = path.read_text().splitlines()
        if head is None and lines:
            head = lines[0]
        tables: list[list[str]] = []
        for line in lines:
            if line.startswith("|"):
                if not tables or not tables[-1]:
                    tables.append([])
                tables[-1].append(line)
            elif tables and tables[-1]:
                tables.append([])
        tables = [t for t in tables if t]
        if tables:
            main_hdr, main_rows = tables[0][:2], main_rows + tables[0][2:]
        if len(tables) > 1:
            loader_hdr, loader_rows = tables[1][:2], loader_rows + tables[1][2:]
    if head is None:
        return "No recipe finished."
    return "\n".join([head.replace("Measured", "bench.py measured"), "", *main_hdr, *main_rows, "",
                      *loader_hdr, *loader_rows])  # fmt: skip


class Report:
    """The markdown report, rewritten whole after every part."""

    def __init__(self, out: Path, command: str, budgets: dict, total: float) -> None:
        self.path = out / "device_check.md"
        self.log = out / "device_check.log"
        self.command, self.budgets, self.total = command, budgets, total
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.header = "(environment part did not finish)"
        self.parts: list[tuple[str, float, str, float]] = []  # name, budget, status, wall
        self.sections: dict[str, str] = {}

    def add(self, name: str, budget: float, status: str, wall: float, section: str | None, log: Path | None) -> None:
        self.parts.append((name, budget, status, wall))
        if section is not None:
            self.sections[name] = section
        if log is not None:
            with self.log.open("a") as f:
                f.write(f"\n===== {name}: {status}, {wall:.0f} s =====\n{log_tail(log, 150)}\n")
        self.write()

    def write(self) -> None:
        t = self.started.strftime("%Y-%m-%d %H:%M UTC")
        used = sum(p[3] for p in self.parts)
        lines = [f"# octlightning device check, {t}", "", *self.header.splitlines()[:2], "",
                 f"Command: `{self.command}`; {used:.0f} s of the {self.total:.0f} s allowed.", "",
                 "| part | limit s | wall s | status |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {b:.0f} | {w:.0f} | {s} |" for n, b, s, w in self.parts]
        env_rest = "\n".join(self.header.splitlines()[3:])
        if env_rest:
            lines += ["", "## Imports per recipe", "", env_rest]
        bench = [v for k, v in self.sections.items() if k == "bench"]
        titles = {"bench": "Throughput (benchmarks/bench.py, one process per recipe)",
                  "oct": "OCT layer boundaries: SegFormer-b0 on Duke DME, fixed time",
                  "vessel": "Vessel U-Net on DRIVE, fixed time"}  # fmt: skip
        for key in ("bench", "oct", "vessel"):
            text = bench[0] if key == "bench" and bench else self.sections.get(key)
            if text:
                lines += ["", f"## {titles[key]}", "", text]
        lines += ["", "Curves: curves.csv (part, elapsed_s, epoch, step, metric, value); each part's output tail: "
                  "device_check.log."]  # fmt: skip
        self.path.write_text("\n".join(lines) + "\n")


def orchestrate(args: argparse.Namespace) -> int:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("device_check.md", "device_check.log", "curves.csv"):
        (out / stale).unlink(missing_ok=True)
    gpu = has_cuda()
    tiny = args.tiny or not gpu
    budgets = dict(TINY_BUDGETS if tiny else GPU_BUDGETS)
    for item in args.budget:
        key, _, value = item.partition("=")
        if key not in budgets:
            sys.exit(f"--budget {item}: unknown part {key!r}; parts are {', '.join(budgets)}")
        budgets[key] = float(value)
    budgets = {k: v * args.budget_scale for k, v in budgets.items()}
    total = (args.total or (TINY_TOTAL if tiny else GPU_TOTAL)) * args.budget_scale
    margin = args.start_margin if args.start_margin is not None else START_MARGIN["tiny" if tiny else "gpu"]
    deadline = time.perf_counter() + total
    command = " ".join(["python3", "benchmarks/device_check.py", *sys.argv[1:]])
    report = Report(out, command, budgets, total)
    report.write()
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--out", str(out), "--work", str(work), "--data", str(args.data)] + (["--tiny"] if tiny else [])
    failed = False

    def allowance(name: str, later: list[str]) -> float | None:
        """This part's limit: its budget, less what the later parts need at least; None to skip it."""
        reserve = sum(budgets[k] * MIN_SHARE for k in later)
        left = deadline - time.perf_counter() - reserve
        limit = min(budgets[name], left)
        return limit if limit >= budgets[name] * MIN_SHARE else None

    bench_names = ["vessel", "ISIC", "SegFormer", "MIRAGE", "RETOUCH"]
    bench_files: list[Path] = []
    bench_notes: list[str] = []
    if importlib.util.find_spec("SimpleITK") is None:
        # The RETOUCH recipes read MetaImage through SimpleITK, which the device image lacks (too big
        # to carry): reported as not run, not as a failure. The env part checks that the others import.
        bench_names.remove("RETOUCH")
        bench_notes.append("- RETOUCH U-Net patches: not run (SimpleITK is not installed on this machine)")
    order = ["env", *(f"bench:{n}" for n in bench_names), "oct", "vessel"]
    for i, name in enumerate(order):
        if args.parts and not any(name.startswith(p) for p in args.parts):
            continue
        later = [p for p in order[i + 1 :] if not args.parts or any(p.startswith(q) for q in args.parts)]
        limit = allowance(name, later)
        if limit is None:
            report.add(name, budgets[name], "skipped: no time left", 0.0, None, None)
            failed = True
            continue
        log = work / f"{name.replace(':', '_')}.log"
        section_file = work / f"{name.replace(':', '_')}.md"
        section_file.unlink(missing_ok=True)
        if name.startswith("bench:"):
            recipe = name.split(":", 1)[1]
            bench_out = work / "bench" / recipe
            for old in bench_out.glob("bench-*.md"):
                old.unlink()
            steps = ["--cpu", "--steps", "2", "--warmup", "1"] if tiny else ["--steps", "30", "--warmup", "5"]
            cmd = [sys.executable, str(BENCH), "--recipes", recipe, "--epochs", "0", "--shared-data", str(args.data),
                   "--out", str(bench_out), *steps]  # fmt: skip
            status, wall = run_limited(cmd, limit, log)
            made = sorted(bench_out.glob("bench-*.md"))
            if status == "ok" and made and merge_bench_tables(made).count("\n| ") >= 4:
                bench_files += made
            else:
                skip = [line for line in log_tail(log, 400).splitlines() if line.startswith("skip ")]
                why = skip[-1] if skip else status
                bench_notes.append(f"- {recipe}: not measured ({why[:300]})")
                failed = True
            section = merge_bench_tables(bench_files) + ("\n\n" + "\n".join(bench_notes) if bench_notes else "")
            report.add(name, limit, status, wall, None, log)
            report.sections["bench"] = section
            report.write()
            continue
        budget_args = ["--limit", f"{limit:.0f}", "--start-margin", f"{margin:.0f}"]
        status, wall = run_limited([*me, "--part", name, "--section", str(section_file), *common, *budget_args],
                                   limit, log)  # fmt: skip
        section = section_file.read_text() if section_file.exists() else None
        if section is None:
            section = f"Did not finish ({status}). Last lines of its output:\n\n```\n{log_tail(log, 25)}\n```"
        if name == "env" and section_file.exists():
            report.header = section
            section = None
        failed |= status != "ok"
        report.add(name, limit, status, wall, section, log)
    print(report.path.read_text())
    print(f"(report: {report.path}; curves: {out / 'curves.csv'}; logs: {report.log})")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.environ.get("OUT") or str(REPO / "runs" / "device-check")
    kit_data = REPO / ".device" / "data"
    parser.add_argument("--out", default=default_out, help="report folder (default $OUT, else runs/device-check)")
    parser.add_argument("--work", default=None, help="run folders and logs (default: runs/device-check-work)")
    parser.add_argument("--data", default=str(kit_data if kit_data.is_dir() else REPO.parent / "shared" / "data"),
                        help="folder holding drive/, duke_dme/, ph2_isic/ (default .device/data, else ../shared/data)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks and budgets (default without a GPU)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every time limit")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help="one part's limit, e.g. --budget vessel=200 --budget bench:MIRAGE=90")
    parser.add_argument("--total", type=float, default=None, help="seconds for all parts together")
    parser.add_argument("--start-margin", type=float, default=None,
                        help="seconds of a training part's limit kept for start-up (trainer.max_time = limit - this)")
    parser.add_argument("--parts", nargs="*", default=None, help="run only the parts starting with these names")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # one part, in a child process
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)  # the part's own limit
    args = parser.parse_args()
    # Absolute paths: the parts run with the repository as their working directory.
    args.work = str(Path(args.work or REPO / "runs" / "device-check-work").resolve())
    args.out, args.data = str(Path(args.out).resolve()), str(Path(args.data).resolve())
    if args.part:
        sys.path.insert(0, str(REPO))
        args.failed = False
        text = PARTS[args.part](args)
        Path(args.section).write_text(text + "\n")
        sys.exit(1 if args.failed else 0)
    sys.exit(orchestrate(args))


if __name__ == "__main__":
    main()
