"""``octlightning sweep``: expand a sweep file into runs, run them on GPUs, CPU slots or SLURM, rank them.

The package, by job: :mod:`.spec` reads a sweep file (``experiments/*.json``) into named runs and has
the CLI parse each of them; :mod:`.launch` starts one stage of a run and keeps its ``status.json``;
:mod:`.local` queues runs onto this machine's GPU groups or CPU slots; :mod:`.slurm` writes and runs a
job array; :mod:`.report` writes ``leaderboard.{csv,md,png}`` and uploads Comet offline archives.

Each run lives in ``<root>/<sweep>/<id>/`` with ``status.json``, ``stdout.log`` and ``stderr.log`` next to
what the CLI writes. Running a sweep again skips finished runs and resumes the others from their
``last.ckpt``. ``octlightning sweep experiments/x.json --gpus 0,1,2,3`` runs locally, ``--slurm
[--submit]`` writes a job array, ``--report`` rewrites the leaderboard, ``--upload`` sends the Comet
offline archives. SLURM tasks run ``python -m octlightning.sweep --task runs.json <i>``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# Only the standard library at import time: SLURM tasks import this package before each run.
from octlightning.sweep import launch
from octlightning.sweep.launch import pending_stages, read_status
from octlightning.sweep.local import local_hardware, run_local
from octlightning.sweep.report import upload, write_leaderboard
from octlightning.sweep.slurm import run_task, slurm_hardware, write_slurm
from octlightning.sweep.spec import Sweep, SweepError, format_value, load_sweep, validate


def _sweep_folder(target: str, root: str | None) -> Path:
    """A sweep folder from a sweep file or the folder itself (for --report / --upload)."""
    path = Path(target)
    if path.is_dir():
        return path
    return load_sweep(path, root).folder


def build_arg_parser() -> argparse.ArgumentParser:
    """The ``octlightning sweep`` options (``--task`` is the hidden entry of a SLURM array task)."""
    parser = argparse.ArgumentParser(
        prog="octlightning sweep",
        description="Run a sweep file's runs on local GPUs or CPU slots, or as a SLURM job array; "
        "finished runs are skipped, interrupted ones resume from last.ckpt.",
    )
    parser.add_argument(
        "sweep", nargs="?", help="sweep file (experiments/*.json); a sweep folder for --report/--upload"
    )
    parser.add_argument(
        "--gpus",
        default=os.environ.get("GPUS") or None,
        help="GPU ids to use, e.g. 0,1,2,3 (default: $GPUS); none given: CPU",
    )
    parser.add_argument("--slots", type=int, default=1, help="parallel runs on CPU (without --gpus)")
    parser.add_argument("--root", default=None, help="runs folder (default: the sweep's 'root', else runs/)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL on Ctrl-C")
    parser.add_argument("--dry-run", action="store_true", help="print the expanded runs (and commands), run nothing")
    parser.add_argument("--slurm", action="store_true", help="write a SLURM job array script instead of running")
    parser.add_argument("--submit", action="store_true", help="with --slurm: submit it with sbatch")
    parser.add_argument("--report", action="store_true", help="only rewrite the leaderboard")
    parser.add_argument("--upload", action="store_true", help="comet upload every run's offline archive")
    parser.add_argument("--task", nargs=2, metavar=("MANIFEST", "INDEX"), help=argparse.SUPPRESS)
    return parser


def _dry_run(sweep: Sweep, hardware: list[str]) -> None:
    validate(sweep, hardware)
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs from {sweep.base} -> {sweep.folder}")
    for run in sweep.runs:
        todo = pending_stages(sweep, run)
        state = "done" if not todo else read_status(sweep.run_dir(run)).get("state", "new")
        overrides = " ".join(f"{k}={format_value(v)}" for k, v in run.overrides.items())
        print(f"{run.index:4d}  {state:11s}  {run.id}\n      {overrides}")
        print(f"      {shlex.join([*launch.CLI_COMMAND, *sweep.cli_args(run, 'fit', hardware)])}")


def main(argv: list[str] | None = None) -> int:
    """``octlightning sweep``; returns the exit status (0 all done, 1 a run failed, 2 bad sweep, 130 stopped)."""
    args = build_arg_parser().parse_args(argv)
    try:
        if args.task:
            return run_task(Path(args.task[0]), int(args.task[1]))
        if not args.sweep:
            build_arg_parser().print_usage()
            return 2
        if args.report:
            path = write_leaderboard(_sweep_folder(args.sweep, args.root))
            print(f"sweep: wrote {path}" if path else "sweep: no runs yet")
            return 0
        if args.upload:
            return upload(_sweep_folder(args.sweep, args.root), args.dry_run)
        sweep = load_sweep(args.sweep, args.root)
        if args.dry_run:
            _dry_run(sweep, slurm_hardware(sweep) if args.slurm else local_hardware(sweep, args.gpus))
            return 0
        if args.slurm:
            write_slurm(sweep, args.submit)
            return 0
        try:
            states = run_local(sweep, args.gpus, args.slots, args.grace)
        except KeyboardInterrupt:
            write_leaderboard(sweep.folder)
            return 130
        board = write_leaderboard(sweep.folder)
        failed = [rid for rid, state in states.items() if state != "done"]
        print(f"sweep {sweep.name}: {len(states) - len(failed)} of {len(states)} runs done; leaderboard {board}")
        for rid in failed:
            print(f"  failed: {rid} (see {sweep.folder / rid / 'stderr.log'}); run the sweep again to retry")
        return 1 if failed else 0
    except SweepError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
