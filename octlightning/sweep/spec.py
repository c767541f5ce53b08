"""The sweep definition: a sweep file expanded into named runs, each checked by the CLI's own parser.

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
Every run is parsed by the CLI's own parser before anything starts (:func:`validate`), so a typo fails the whole
sweep. Each run has a stable id derived from its overrides and lives in ``<root>/<sweep>/<id>/`` (the
CLI's ``--experiment <sweep> --version <id>`` run folder).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Only the standard library at import time: SLURM tasks import this package before each run.

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


class SweepError(Exception):
    """A sweep file that cannot be run as written; the message says which run and key."""


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


def labels(keys: list[str]) -> dict[str, str]:
    """Short names for table headers and ids: last key component, the full key where two would clash."""
    shorts = [_short_key(k) for k in keys]
    return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts, strict=True)}


def run_id(overrides: dict[str, Any], fixed: dict[str, Any] | None = None) -> str:
    """Stable id of a run: readable ``key=value`` pairs plus a hash of all its overrides.

    The hash covers ``fixed`` too, so changing a fixed override gives new runs instead of wrongly
    skipping the old ones; key order does not matter.
    """
    keys = sorted(overrides)
    names = labels(keys)
    slug = "_".join(f"{names[k]}={format_value(overrides[k])}" for k in keys)
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
        """``<root>/<name>``: the run folders, ``leaderboard.*`` and the SLURM files."""
        return self.root / self.name

    @property
    def stages(self) -> list[str]:
        """The CLI commands each run goes through, in order."""
        return ["fit", "test"] if self.test else ["fit"]

    def run_dir(self, run: Run) -> Path:
        """The run's folder, the CLI's ``<root>/<experiment>/<version>``."""
        return self.folder / run.id

    def tags(self, run: Run) -> list[str]:
        """Comet tags of a run: the sweep name and one ``key=value`` per override."""
        names = labels(sorted(run.overrides))
        return [self.name, *(f"{names[k]}={format_value(v)}" for k, v in sorted(run.overrides.items()))]

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
    """Read and expand a sweep file (not yet checked against the CLI; see :func:`validate`).

    Raises :class:`SweepError` for a missing or malformed file, an unknown or reserved key, a bad
    value, or two runs with the same overrides.
    """
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


def cli_parser():
    """The CLI's parser (``fit`` and the other subcommands), built once without parsing or instantiating.

    ``exit_on_error=False`` so that errors are exceptions (the CLI refuses abbreviations: a typo such as
    ``trainer.max_epoch`` is an error rather than a silently expanded option).

    The one import of :mod:`octlightning.cli` in this package, made here on first use (it brings torch
    and Lightning). Running ``octlightning fit --print_config`` per run instead would avoid it, but costs
    a CLI start-up (torch, Lightning) per run: 12 runs took 266 s instead of 0.85 s on a loaded 2-core machine.
    """
    global _PARSER
    if _PARSER is None:
        from octlightning.cli import argument_parser

        _PARSER = argument_parser(exit_on_error=False)
    return _PARSER


def validate(sweep: Sweep, hardware: list[str] | None = None) -> None:
    """Parse every run's ``fit`` arguments with the CLI parser and build its DataModule (which checks its
    arguments against each other, e.g. ``fold`` below ``num_folds``, without reading data); one error
    lists every bad run.

    Raises :class:`SweepError` naming each run that does not parse, its overrides and the parser's message.
    """
    parser = cli_parser()
    errors = []
    for run in sweep.runs:
        try:
            data = parser.parse_args(sweep.cli_args(run, "fit", hardware))["fit"].get("data")
            if data is not None and data.get("class_path"):
                module, _, name = data["class_path"].rpartition(".")
                getattr(importlib.import_module(module), name)(**data["init_args"].as_dict())
        except Exception as err:  # jsonargparse.ArgumentError and the type errors it wraps; a DataModule's own
            message = "\n    ".join(line for line in str(err).splitlines() if line.strip())
            errors.append(f"  run {run.index} ({run.id}), overrides {run.overrides}:\n    {message}")
    if errors:
        raise SweepError(
            f"{len(errors)} of {len(sweep.runs)} runs of sweep {sweep.name!r} do not parse; nothing was started:\n"
            + "\n".join(errors)
        )
