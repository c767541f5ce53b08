"""Hyperparameter sweeps: expand a sweep file into runs, run them on GPUs, CPU slots or SLURM, rank them.

A sweep file (``experiments/*.json``) names a base config and the overrides to try, with the CLI's
dotted keys::

    {
      "base": "hparams/vessel_unet.json",
      "grid": {"model.init_args.lr": [1e-4, 5e-5], "data.init_args.batch_size": [4, 16]},
      "runs": [{"model.init_args.lr": 3e-4, "trainer.max_epochs": 50}],
      "sample": null, "sample_seed": 0,
      "seeds": [1, 2],
      "fixed": {"trainer.check_val_every_n_epoch": 5},
      "gpus_per_run": 1, "nodes_per_run": 1,
      "test": false,
      "slurm": {"time": "24:00:00", "partition": "gpu", "max_parallel": 8}
    }

Runs are the grid points (all of them, or ``sample`` of them drawn with ``sample_seed``), then the
``runs`` entries, each repeated for every seed (``seed_everything``); ``fixed`` goes into every run.
Every run is parsed by the CLI's own parser before anything starts, so a typo fails the whole sweep.

Each run has a stable id derived from its overrides and lives in ``<root>/<sweep>/<id>/`` (the CLI's
``--experiment <sweep> --version <id>`` run folder) with ``status.json``, ``stdout.log`` and
``stderr.log`` next to what the CLI writes. Running a sweep again skips finished runs and resumes the
others from their ``last.ckpt`` (the CLI does that for a named version). ``leaderboard.{csv,md,png}``
in the sweep folder rank the runs by their monitored validation metric.

``octlightning sweep experiments/x.json --gpus 0,1,2,3`` runs locally, ``--slurm [--submit]`` writes a
job array, ``--report`` rewrites the leaderboard, ``--upload`` sends the Comet offline archives.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

# Only the standard library at import time: SLURM tasks import this module before each run.

SWEEP_KEYS = {
    "name",
    "description",
    "base",
    "root",
    "grid",
    "runs",
    "sample",
    "sample_seed",
    "seeds",
    "fixed",
    "gpus_per_run",
    "nodes_per_run",
    "test",
    "slurm",
}
# Set by the sweep itself for every run; an override of these would break the run-folder layout.
RESERVED_KEYS = {
    "config",
    "experiment",
    "version",
    "ckpt_path",
    "trainer.default_root_dir",
    "comet_project",
    "comet_tags",
}
DEFAULT_MONITOR = ("val/dice", "max")
STAGES = ("fit", "test")
# What starts one CLI command; tests replace it to run a stand-in program.
CLI_COMMAND = [sys.executable, "-m", "octlightning"]


class SweepError(Exception):
    """A sweep file that cannot be run as written; the message says which run and key."""


# ---------------------------------------------------------------------------------------------- runs
def _short_key(key: str) -> str:
    tail = key.rsplit(".", 1)[-1]
    return "seed" if tail == "seed_everything" else tail


def format_value(value: Any) -> str:
    """How a value appears in a run id, a tag or a table (``1e-4`` -> ``0.0001``, ``5e-05``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def cli_value(value: Any) -> str:
    """A value as one CLI argument (strings as they are, everything else as JSON, which the CLI parses)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _labels(keys: list[str]) -> dict[str, str]:
    """Short names for table headers and ids: last key component, the full key where two would clash."""
    shorts = [_short_key(k) for k in keys]
    return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts, strict=True)}


def run_id(overrides: dict[str, Any], fixed: dict[str, Any] | None = None) -> str:
    """Stable id of a run: readable ``key=value`` pairs plus a hash of all its overrides.

    The hash covers ``fixed`` too, so changing a fixed override gives new runs instead of wrongly
    skipping the old ones; key order does not matter.
    """
    keys = sorted(overrides)
    labels = _labels(keys)
    slug = "_".join(f"{labels[k]}={format_value(overrides[k])}" for k in keys)
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "-", slug)[:80].strip("-_") or "run"
    payload = json.dumps({"fixed": fixed or {}, "overrides": overrides}, sort_keys=True, default=str)
    return f"{slug}-{hashlib.sha1(payload.encode()).hexdigest()[:8]}"


@dataclass
class Run:
    """One expanded run: its overrides (the swept keys, seed included) and its id."""

    index: int
    id: str
    overrides: dict[str, Any]


@dataclass
class Sweep:
    """A loaded, expanded sweep file."""

    name: str
    base: Path
    root: Path
    runs: list[Run]
    fixed: dict[str, Any] = field(default_factory=dict)
    gpus_per_run: int = 1
    nodes_per_run: int = 1
    test: bool = False
    slurm: dict[str, Any] = field(default_factory=dict)
    cwd: Path = field(default_factory=Path.cwd)

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def stages(self) -> list[str]:
        return ["fit", "test"] if self.test else ["fit"]

    def run_dir(self, run: Run) -> Path:
        return self.folder / run.id

    def tags(self, run: Run) -> list[str]:
        labels = _labels(sorted(run.overrides))
        return [self.name, *(f"{labels[k]}={format_value(v)}" for k, v in sorted(run.overrides.items()))]

    def cli_args(self, run: Run, stage: str, hardware: list[str] | None = None, ckpt: Path | None = None) -> list[str]:
        """The CLI arguments of one stage of a run (without the program).

        Hardware arguments come before the user's overrides (which may refine them), the run-folder
        arguments after them (the sweep owns those). The test stage always uses one device.
        """
        args = [stage, "--config", str(self.base), *(hardware or [])]
        for key, value in {**self.fixed, **run.overrides}.items():
            args += [f"--{key}", cli_value(value)]
        args += [
            "--trainer.default_root_dir",
            str(self.root),
            "--experiment",
            self.name,
            "--version",
            run.id,
            "--comet_project",
            self.name,
            "--comet_tags",
            json.dumps(self.tags(run)),
        ]
        if stage == "test":
            args += ["--trainer.devices", "1", "--trainer.num_nodes", "1"]
            if ckpt is not None:
                args += ["--ckpt_path", str(ckpt)]
        return args


def _resolve_base(base: str, sweep_file: Path) -> Path:
    """The base config: absolute, else relative to the current folder, else to the folder above the sweep
    file's folder (the repository root for ``experiments/*.json``)."""
    path = Path(base).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, sweep_file.resolve().parent.parent / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise SweepError(f"{sweep_file}: base config {base!r} not found (looked at {', '.join(map(str, candidates))})")


def _check_overrides(where: str, overrides: Any) -> dict[str, Any]:
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}: expected an object of dotted CLI keys, got {overrides!r}")
    for key in overrides:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise SweepError(f"{where}: {key!r} is not a dotted CLI key like 'model.init_args.lr'")
        if key in RESERVED_KEYS:
            raise SweepError(f"{where}: {key!r} is set by the sweep itself (use the sweep's 'root'/'name')")
    return dict(overrides)


def expand(spec: dict[str, Any], where: str = "sweep") -> list[dict[str, Any]]:
    """The override sets of a sweep spec, in a deterministic order (grid, then list; each for every seed)."""
    grid = _check_overrides(f"{where}: grid", spec.get("grid") or {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: grid[{key!r}] must be a non-empty list of values")
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] if grid else []
    sample = spec.get("sample")
    if sample is not None:
        if not grid:
            raise SweepError(f"{where}: 'sample' draws from the grid, but there is no grid")
        if not isinstance(sample, int) or not 0 < sample <= len(points):
            raise SweepError(f"{where}: 'sample' must be an integer from 1 to {len(points)} (the grid size)")
        picked = random.Random(spec.get("sample_seed", 0)).sample(range(len(points)), sample)
        points = [points[i] for i in sorted(picked)]  # keep grid order
    listed = spec.get("runs") or []
    if not isinstance(listed, list):
        raise SweepError(f"{where}: 'runs' must be a list of override objects")
    points += [_check_overrides(f"{where}: runs[{i}]", entry) for i, entry in enumerate(listed)]
    if not points:
        points = [{}]
    seeds = spec.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise SweepError(f"{where}: 'seeds' must be a non-empty list of integers")
        points = [{**point, "seed_everything": seed} for point in points for seed in seeds]
    return points


def load_sweep(path: str | Path, root: str | Path | None = None) -> Sweep:
    """Read and expand a sweep file (not yet validated against the CLI; see :func:`validate`)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except json.JSONDecodeError as err:
        raise SweepError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep file is a JSON object")
    unknown = sorted(set(spec) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown sweep keys {unknown}; allowed: {sorted(SWEEP_KEYS)}")
    if "base" not in spec:
        raise SweepError(f"{path}: 'base' (the hparams/*.json config the runs start from) is missing")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SweepError(f"{path}: sweep name {name!r} may hold only letters, digits, '.', '_' and '-'")
    fixed = _check_overrides(f"{path}: fixed", spec.get("fixed") or {})
    gpus, nodes = spec.get("gpus_per_run", 1), spec.get("nodes_per_run", 1)
    for key, value in (("gpus_per_run", gpus), ("nodes_per_run", nodes)):
        if not isinstance(value, int) or value < 1:
            raise SweepError(f"{path}: {key!r} must be a positive integer")
    slurm = spec.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SweepError(f"{path}: 'slurm' must be an object of sbatch options")
    if not isinstance(slurm.get("max_parallel", 1), int) or slurm.get("max_parallel", 1) < 1:
        raise SweepError(f"{path}: slurm 'max_parallel' must be a positive integer")

    runs, seen = [], {}
    for overrides in expand(spec, str(path)):
        rid = run_id(overrides, fixed)
        if rid in seen:
            raise SweepError(f"{path}: the same run appears twice ({overrides}); remove the duplicate")
        seen[rid] = overrides
        runs.append(Run(index=len(runs), id=rid, overrides=overrides))
    return Sweep(
        name=name,
        base=_resolve_base(str(spec["base"]), path),
        root=Path(root or spec.get("root") or "runs").expanduser().resolve(),
        runs=runs,
        fixed=fixed,
        gpus_per_run=gpus,
        nodes_per_run=nodes,
        test=bool(spec.get("test", False)),
        slurm=slurm,
    )


# ---------------------------------------------------------------------------------------------- validation
_PARSER = None


def fit_parser():
    """The CLI's ``fit`` parser, built once without parsing or instantiating anything.

    ``allow_abbrev=False`` so that a typo such as ``trainer.max_epoch`` is an error rather than a
    silently expanded abbreviation; ``exit_on_error=False`` so that errors are exceptions.
    """
    global _PARSER
    if _PARSER is None:
        from octlightning.cli import OctLightningCLI

        class _ParserOnlyCLI(OctLightningCLI):
            # LightningCLI.__init__ builds the parsers, then parses and instantiates: keep only the first.
            def parse_arguments(self, parser, args) -> None:
                self.config = {"subcommand": None}

            def _parse_ckpt_path(self) -> None: ...
            def _set_seed(self) -> None: ...
            def _add_instantiators(self) -> None: ...
            def before_instantiate_classes(self) -> None: ...
            def instantiate_classes(self) -> None: ...
            def after_instantiate_classes(self) -> None: ...

        kwargs = {"exit_on_error": False, "allow_abbrev": False}
        cli = _ParserOnlyCLI(args=[], parser_kwargs={**kwargs, "fit": dict(kwargs)})
        _PARSER = cli._subcommand_parsers["fit"]
    return _PARSER


def validate(sweep: Sweep, hardware: list[str] | None = None) -> None:
    """Parse every run's ``fit`` arguments with the CLI parser; one error lists every bad run."""
    parser = fit_parser()
    errors = []
    for run in sweep.runs:
        try:
            parser.parse_args(sweep.cli_args(run, "fit", hardware)[1:])
        except Exception as err:  # jsonargparse.ArgumentError and the type errors it wraps
            message = "\n    ".join(line for line in str(err).splitlines() if line.strip())
            errors.append(f"  run {run.index} ({run.id}), overrides {run.overrides}:\n    {message}")
    if errors:
        raise SweepError(
            f"{len(errors)} of {len(sweep.runs)} runs of sweep {sweep.name!r} do not parse; nothing was started:\n"
            + "\n".join(errors)
        )


# ---------------------------------------------------------------------------------------------- status
def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """Atomic write: a reader (a report, another SLURM task) never sees half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".status.json.{os.getpid()}"
    tmp.write_text(json.dumps(status, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / "status.json")


def pending_stages_from(sweep: Sweep, status: dict[str, Any]) -> list[str]:
    """The stages (fit, test) a run still has to do according to its status."""
    return [s for s in sweep.stages if s not in status.get("stages_done", [])]


def pending_stages(sweep: Sweep, run: Run) -> list[str]:
    return pending_stages_from(sweep, read_status(sweep.run_dir(run)))


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class _Child:
    """A started stage of a run."""

    run: Run
    stage: str
    proc: subprocess.Popen
    logs: list[TextIO]
    slot: int
    started: float


def _launch(sweep: Sweep, run: Run, stage: str, env: dict[str, str], prefix: list[str], hardware: list[str], slot: int):
    """Start one stage of a run in its own process group, output appended to the run's log files."""
    run_dir = sweep.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if stage == "test":
        best = run_dir / "checkpoints" / "best.ckpt"
        ckpt = best if best.is_file() else run_dir / "checkpoints" / "last.ckpt"
    cmd = [*prefix, *CLI_COMMAND, *sweep.cli_args(run, stage, hardware, ckpt)]
    status = read_status(run_dir)
    attempts = dict(status.get("attempts") or {})
    attempts[stage] = attempt = attempts.get(stage, 0) + 1
    header = f"\n=== {_now()} {stage} attempt {attempt}: {shlex.join(cmd)}\n"
    logs = [open(run_dir / "stdout.log", "a"), open(run_dir / "stderr.log", "a")]  # closed in _finish
    for log in logs:
        log.write(header)
        log.flush()
    # An argument list, never a shell string; a new session so that stopping it reaches its whole tree.
    proc = subprocess.Popen(
        cmd, cwd=sweep.cwd, env=env, stdout=logs[0], stderr=logs[1], stdin=subprocess.DEVNULL, start_new_session=True
    )
    status.update(
        id=run.id,
        sweep=sweep.name,
        overrides=run.overrides,
        state="running",
        stage=stage,
        attempts=attempts,
        pid=proc.pid,
        devices=env.get("CUDA_VISIBLE_DEVICES"),
        host=os.uname().nodename,
        started=_now(),
        command=cmd,
    )
    status.setdefault("stages_done", [])
    write_status(run_dir, status)
    return _Child(run, stage, proc, logs, slot, time.monotonic())


def _finish(sweep: Sweep, child: _Child, returncode: int, interrupted: bool = False) -> str:
    """Record how a stage ended; returns the run's new state."""
    for log in child.logs:
        log.close()
    run_dir = sweep.run_dir(child.run)
    status = read_status(run_dir)
    status.update(returncode=returncode, ended=_now(), pid=None)
    if interrupted:
        status["state"] = "interrupted"
    elif returncode == 0:
        status["stages_done"] = sorted(set(status.get("stages_done", [])) | {child.stage}, key=STAGES.index)
        status["state"] = "done" if not pending_stages_from(sweep, status) else "pending"
        status.pop("failed_stage", None)
    else:
        status["state"] = "failed"
        status["failed_stage"] = child.stage
    write_status(run_dir, status)
    return status["state"]


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join("      " + line for line in [t for t in text if t.strip()][-lines:])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_process_groups(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every child's process group (the child saves ``last.ckpt`` and exits), SIGKILL what is
    left after ``grace`` seconds, including processes the child started (loader workers, DDP ranks)."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------------- local
def slot_devices(gpus: str | None, gpus_per_run: int, slots: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each slot: GPU groups of ``gpus_per_run``, or ``slots`` CPU slots ("")."""
    if not gpus:
        return [""] * max(1, slots)
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if len(ids) < gpus_per_run:
        raise SweepError(f"--gpus {gpus}: {len(ids)} GPU(s) given but each run takes {gpus_per_run}")
    if len(ids) % gpus_per_run:
        print(f"sweep: {len(ids) % gpus_per_run} GPU(s) of {gpus} left idle ({gpus_per_run} per run)", flush=True)
    return [",".join(ids[i : i + gpus_per_run]) for i in range(0, len(ids) - gpus_per_run + 1, gpus_per_run)]


def local_hardware(sweep: Sweep, gpus: str | None) -> list[str]:
    if gpus:
        return ["--trainer.accelerator", "gpu", "--trainer.devices", str(sweep.gpus_per_run)]
    return ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]


class _SweepLock:
    """One scheduler per sweep folder at a time (two would start the same runs twice)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / ".lock", "w")  # released in __exit__

    def __enter__(self) -> _SweepLock:
        import fcntl

        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise SweepError(f"{self.file.name}: another `octlightning sweep` is running this sweep") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


def run_local(
    sweep: Sweep, gpus: str | None = None, slots: int = 1, grace: float = 30.0, poll: float = 0.2
) -> dict[str, str]:
    """Run every unfinished run, as many at once as there are slots; returns ``{run id: state}``.

    Runs that fail are reported and the others go on. On Ctrl-C (or SIGTERM) the children get SIGTERM,
    then SIGKILL after ``grace`` seconds; their runs are marked interrupted and resume next time.
    """
    if sweep.nodes_per_run > 1:
        raise SweepError(f"sweep {sweep.name!r}: runs over {sweep.nodes_per_run} nodes need --slurm")
    devices = slot_devices(gpus, sweep.gpus_per_run, slots)
    hardware = local_hardware(sweep, gpus)
    validate(sweep, hardware)
    threads = str(max(1, (os.cpu_count() or 1) // len(devices)))
    where = f"GPU groups {devices}" if gpus else f"{len(devices)} CPU slot(s)"
    unit = "GPU" if gpus else "CPU slot"
    states: dict[str, str] = {}
    running: dict[int, _Child] = {}

    def start(run: Run, slot: int) -> None:
        stage = pending_stages(sweep, run)[0]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices[slot], PYTHONUNBUFFERED="1")
        if not gpus:
            env.setdefault("OMP_NUM_THREADS", threads)  # parallel CPU runs must not oversubscribe the cores
        resume = stage == "fit" and (sweep.run_dir(run) / "checkpoints" / "last.ckpt").is_file()
        running[slot] = _launch(sweep, run, stage, env, [], hardware, slot)
        note = " (resuming from last.ckpt)" if resume else ""
        print(f"[{_now()}] start {run.id} {stage} on {unit} {devices[slot] or slot}{note}", flush=True)

    def finished(slot: int, child: _Child, returncode: int) -> None:
        state = _finish(sweep, child, returncode)
        states[child.run.id] = state
        took = time.monotonic() - child.started
        if state == "failed":
            log = sweep.run_dir(child.run) / "stderr.log"
            print(
                f"[{_now()}] FAILED {child.run.id} {child.stage} ({_describe_exit(returncode)}, {took:.0f} s); "
                f"see {log}:\n{_tail(log)}",
                flush=True,
            )
            return
        print(f"[{_now()}] finished {child.run.id} {child.stage} ({took:.0f} s)", flush=True)
        if state == "pending":  # the next stage (test) of the same run, on the same slot
            start(child.run, slot)

    with _SweepLock(sweep.folder):
        queue = [run for run in sweep.runs if pending_stages(sweep, run)]
        states.update({run.id: "done" for run in sweep.runs if run not in queue})
        print(
            f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(states)} already done, {len(queue)} to run on "
            f"{where} -> {sweep.folder}",
            flush=True,
        )
        previous = _install_sigterm_handler()
        try:
            while queue or running:
                for slot in range(len(devices)):
                    if slot not in running and queue:
                        start(queue.pop(0), slot)
                for slot, child in list(running.items()):
                    returncode = child.proc.poll()
                    if returncode is not None:
                        del running[slot]
                        finished(slot, child, returncode)
                time.sleep(poll)
        except KeyboardInterrupt:
            print(f"\nsweep {sweep.name}: interrupted, stopping {len(running)} run(s)", flush=True)
            stop_process_groups([child.proc for child in running.values()], grace)
            for child in running.values():
                _finish(sweep, child, child.proc.returncode, interrupted=True)
                print(f"  {child.run.id}: stopped, resumes from last.ckpt next time", flush=True)
            raise
        finally:
            _restore_sigterm_handler(previous)
    return states


def _install_sigterm_handler() -> Any:
    """SIGTERM to the scheduler (kill, a batch system) stops the children like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm_handler(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- SLURM
MANIFEST = "runs.json"
SCRIPT = "sweep.sbatch"


def slurm_hardware(sweep: Sweep) -> list[str]:
    return [
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        str(sweep.gpus_per_run),
        "--trainer.num_nodes",
        str(sweep.nodes_per_run),
    ]


def write_manifest(sweep: Sweep, hardware: list[str]) -> Path:
    """``runs.json``: everything a SLURM task needs to run run i, without the sweep file."""
    manifest = {
        "sweep": sweep.name,
        "cwd": str(sweep.cwd),
        "base": str(sweep.base),
        "root": str(sweep.root),
        "fixed": sweep.fixed,
        "test": sweep.test,
        "gpus_per_run": sweep.gpus_per_run,
        "nodes_per_run": sweep.nodes_per_run,
        "hardware": hardware,
        "runs": [{"index": r.index, "id": r.id, "overrides": r.overrides} for r in sweep.runs],
    }
    sweep.folder.mkdir(parents=True, exist_ok=True)
    path = sweep.folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _sweep_from_manifest(path: Path) -> tuple[Sweep, list[str]]:
    m = json.loads(path.read_text())
    runs = [Run(r["index"], r["id"], r["overrides"]) for r in m["runs"]]
    sweep = Sweep(
        name=m["sweep"],
        base=Path(m["base"]),
        root=Path(m["root"]),
        runs=runs,
        fixed=m["fixed"],
        gpus_per_run=m["gpus_per_run"],
        nodes_per_run=m["nodes_per_run"],
        test=m["test"],
        cwd=Path(m["cwd"]),
    )
    return sweep, m["hardware"]


def _sbatch_option(key: str, value: Any) -> str:
    text = f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}")
    if not re.fullmatch(r"--[A-Za-z0-9-]+(=[^\s'\"\\$`;|&<>]+)?", text):
        raise SweepError(f"slurm option {key!r}: {value!r} cannot go on an #SBATCH line (no spaces or quotes)")
    return f"#SBATCH {text}"


def slurm_script(sweep: Sweep, manifest: Path) -> str:
    """One job array, one task per run; task i runs run i of the manifest through ``srun``."""
    options = dict(sweep.slurm)
    max_parallel = options.pop("max_parallel", None)
    array = f"0-{len(sweep.runs) - 1}" + (f"%{int(max_parallel)}" if max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"# octlightning sweep {sweep.name}: {len(sweep.runs)} runs, one array task per run.",
        f"# Generated by `octlightning sweep --slurm`; array task i runs run i of {MANIFEST} next to this script.",
        "# Finished runs are skipped; an interrupted or requeued run resumes from its checkpoints/last.ckpt.",
        "#",
        "# Each run takes --nodes x --ntasks-per-node processes, one per GPU. srun starts them and Lightning's",
        "# SLURM environment reads SLURM_PROCID/SLURM_NTASKS/SLURM_NODELIST to set up DDP, across nodes too.",
        '# Multi-node DDP for one large run: a sweep file with one run and "nodes_per_run": N (and',
        '# "gpus_per_run": GPUs per node) gives --nodes=N here and --trainer.num_nodes N to the run.',
        "# SIGUSR1 90 s before the time limit makes Lightning checkpoint and requeue the task (--requeue).",
        f"#SBATCH --job-name={re.sub(r'[^A-Za-z0-9._-]', '_', sweep.name)}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={sweep.nodes_per_run}",
        f"#SBATCH --ntasks-per-node={sweep.gpus_per_run}",
        f"#SBATCH --gres=gpu:{sweep.gpus_per_run}",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        *(_sbatch_option(k, v) for k, v in options.items()),
        "set -euo pipefail",
        f"cd {shlex.quote(str(sweep.cwd))}",
        f"exec {shlex.quote(sys.executable)} -m octlightning.sweep --task {shlex.quote(str(manifest))}"
        ' "$SLURM_ARRAY_TASK_ID"',
        "",
    ]
    return "\n".join(lines)


def write_slurm(sweep: Sweep, submit: bool = False) -> Path:
    """Validate, write ``runs.json`` and ``sweep.sbatch`` into the sweep folder, optionally ``sbatch`` it."""
    hardware = slurm_hardware(sweep)
    validate(sweep, hardware)
    manifest = write_manifest(sweep, hardware)
    script = sweep.folder / SCRIPT
    script.write_text(slurm_script(sweep, manifest))
    script.chmod(0o755)
    print(f"sweep {sweep.name}: wrote {script} ({len(sweep.runs)} array tasks) and {manifest}", flush=True)
    if submit:
        sbatch = shutil.which("sbatch")
        if sbatch is None:
            raise SweepError("--submit: sbatch not found on PATH (run this on a SLURM login node)")
        logs = sweep.folder / "slurm"
        logs.mkdir(exist_ok=True)
        # Submitted from the logs folder, so slurm-<job>_<task>.out land there.
        out = subprocess.run([sbatch, str(script)], cwd=logs, check=True, capture_output=True, text=True)
        print(out.stdout.strip(), flush=True)
    else:
        print(f"submit with: cd {shlex.quote(str(sweep.folder / 'slurm'))} && sbatch {shlex.quote(str(script))}")
    return script


def run_task(manifest: Path, index: int) -> int:
    """Array task ``index``: run the unfinished stages of run ``index`` (under ``srun`` inside a job)."""
    sweep, hardware = _sweep_from_manifest(manifest)
    run = sweep.runs[index]
    stages = pending_stages(sweep, run)
    if not stages:
        print(f"sweep {sweep.name}: run {index} ({run.id}) is done, nothing to do", flush=True)
        return 0
    srun = shutil.which("srun") if os.environ.get("SLURM_JOB_ID") else None
    returncode = 0
    for stage in stages:
        prefix = []
        if srun:
            prefix = [srun, "--kill-on-bad-exit=1"] + (["--nodes=1", "--ntasks=1"] if stage == "test" else [])
        print(f"[{_now()}] start {run.id} {stage} (task {index})", flush=True)
        child = _launch(sweep, run, stage, dict(os.environ, PYTHONUNBUFFERED="1"), prefix, hardware, 0)
        returncode = child.proc.wait()
        state = _finish(sweep, child, returncode)
        print(f"[{_now()}] {state} {run.id} {stage} ({_describe_exit(returncode)})", flush=True)
        if returncode != 0:
            break
    try:
        write_leaderboard(sweep.folder)
    except Exception as err:  # a report problem must not fail the run
        print(f"sweep: leaderboard not written: {err}", flush=True)
    return 0 if returncode == 0 else 1


# ---------------------------------------------------------------------------------------------- leaderboard
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
    labels = _labels(keys)

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

    md_header = [*header[:3], *(labels[k] for k in keys), *header[3 + len(keys) :]]
    md = [
        f"# Sweep {folder.name}: {len(rows)} runs, best {rows[0]['monitor']} first",
        "",
        "| " + " | ".join(md_header) + " |",
        "|" + "---|" * len(md_header),
        *("| " + " | ".join(str(c) for c in line) + " |" for line in table),
        "",
    ]
    (folder / "leaderboard.md").write_text("\n".join(md))
    _plot(folder / "leaderboard.png", rows, keys, labels)
    return csv_path


def _plot(path: Path, rows: list[dict[str, Any]], keys: list[str], labels: dict[str, str]) -> None:
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
                names = sorted({format_value(v) for v in values})
                ax.scatter([names.index(format_value(v)) for v in values], ys)
                ax.set_xticks(range(len(names)), names, rotation=30)
            ax.set_xlabel(labels[key])
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


# ---------------------------------------------------------------------------------------------- command line
def _sweep_folder(target: str, root: str | None) -> Path:
    """A sweep folder from a sweep file or the folder itself (for --report / --upload)."""
    path = Path(target)
    if path.is_dir():
        return path
    return load_sweep(path, root).folder


def build_arg_parser() -> argparse.ArgumentParser:
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
        print(f"      {shlex.join([*CLI_COMMAND, *sweep.cli_args(run, 'fit', hardware)])}")


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


if __name__ == "__main__":
    sys.exit(main())
