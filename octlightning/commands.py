"""The ``octlightning`` command: one entry point for every command, each with its own ``--help``.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands
(:mod:`octlightning.cli`); the others are plain argparse programs in their own modules, imported only
when called so that ``octlightning --help`` and SLURM sweep tasks start fast.
"""

from __future__ import annotations

import importlib
import json
import re
import signal
import sys
import warnings
from collections.abc import Callable

import octlightning  # noqa: F401  (applies the offline environment defaults first)
from octlightning.errors import ConfigError, DataError

# name -> (one-line help, "module:function" taking argv and returning an exit status, or None for
# the LightningCLI subcommands)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "fit": ("train and validate a recipe, checkpointing into runs/<experiment>/<version>/", None),
    "validate": ("score a checkpoint on the validation split", None),
    "test": ("score a checkpoint on the test split; per-image and per-volume tables in the run folder", None),
    "predict": ("write masks, boundary coordinates or volumes for new images with a checkpoint", None),
    "check-data": ("read every split of a config's dataset and report each problem (builds no model)",
                   "octlightning.check_data:main"),
    "sweep": ("run, queue and report a sweep of configs over GPUs, locally or on SLURM", "octlightning.sweep:main"),
    "evaluate": ("score a folder of predictions against reference masks (MIRAGE layout)",
                 "octlightning.evaluate:main"),
    "convert": ("convert datasets (HDF5 layers -> MIRAGE layout) and write synthetic demo data",
                "octlightning.conversion:main"),
}  # fmt: skip

LIGHTNING_COMMANDS = [name for name, (_, target) in COMMANDS.items() if target is None]


def usage() -> str:
    """The text of ``octlightning --help``: every command with its one-line help."""
    width = max(map(len, COMMANDS))
    lines = ["usage: octlightning <command> [options]   (octlightning <command> --help for its options)", "",
             "commands:"]  # fmt: skip
    lines += [f"  {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items()]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], int | None]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


# A `--a.init_args.b.init_args.c null` option: jsonargparse (4.53) reads a null two subclasses deep as
# the string "None"; the same value given as a nested dict arrives as None.
_DEEP_KEY = re.compile(r"--((?:[^=\s]+\.)?init_args\.[^=\s]+)\.init_args\.([A-Za-z_]\w*)")


def null_means_none(argv: list[str]) -> list[str]:
    """Rewrite ``--x.init_args.net.init_args.key null`` as ``--x.init_args.net {"init_args": {"key": null}}``.

    ``null`` means ``None`` at any depth of the config on the command line, as it does in the JSON
    file. Options above that depth and other values are passed on unchanged.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, value, used = arg, None, 1
        if "=" in arg and arg.startswith("--"):
            key, value = arg.split("=", 1)
        elif i + 1 < len(argv):
            value, used = argv[i + 1], 2
        m = _DEEP_KEY.fullmatch(key)
        if m and value is not None and value.strip().lower() in ("null", "none"):
            out += [f"--{m.group(1)}", json.dumps({"init_args": {m.group(2): None}})]
            i += used
        else:
            out.append(arg)
            i += 1
    return out


def _one_line(err: BaseException) -> str:
    """The user-facing line of a DataError/ConfigError, also when it arrives wrapped by a loader worker."""
    message = str(err).strip().splitlines()
    name = type(err).__name__
    cause = next((line for line in reversed(message) if f"{name}: " in line), message[-1] if message else "")
    return cause.split(f"{name}: ", 1)[-1]


def _users_to_fix(err: BaseException) -> Exception | None:
    """The DataError/ConfigError behind ``err``: itself, or one it was raised while handling; or
    Lightning's MisconfigurationException (a trainer option it refuses, e.g. ``max_time "1 minute"``).

    jsonargparse reports an error raised while building a class (a network whose weights file is
    missing) as its own "Does not validate against any of the Union subtypes" ValueError, raised while
    handling ours.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DataError | ConfigError | MisconfigurationException):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``octlightning``): dispatch to the named command and exit with its status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        print(f"octlightning: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    target = COMMANDS[name][1]
    if target is not None:
        sys.exit(_load(target)(argv[1:]) or 0)
    from octlightning.cli import run_cli

    try:
        with warnings.catch_warnings():
            # The arguments are sys.argv's, rewritten (null_means_none): nothing is given twice.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            run_cli(null_means_none(argv))
    except BaseException as err:
        from octlightning.callbacks import LastCheckpoint, SigtermStop

        user_error = _users_to_fix(err)
        if user_error is not None:
            # The user's data or config to fix, not ours to debug: one line naming the file or the key, no
            # traceback (from a loader worker the message arrives wrapped in the worker's traceback text).
            kind = "data" if isinstance(user_error, DataError) else "config"
            print(f"octlightning: {kind} error: {_one_line(user_error)}", file=sys.stderr)
            sys.exit(1)
        if SigtermStop.stopped is None and not LastCheckpoint.stopped_by_sigterm:
            raise
        # Stopped on purpose (timeout, scancel, a sweep's Ctrl-C): not a crash to debug (the error is the
        # loader workers' death from the same signal), nor a success (Lightning's own SIGTERMException is a
        # SystemExit with status 0, so `timeout ... fit && test` went on to test an unfinished run, and a
        # test that wrote no results passed). The status is that of a process SIGTERM ended, 128 + 15.
        if LastCheckpoint.stopped_by_sigterm:
            said = "fit stopped by SIGTERM; the same command with its --version resumes it"
        else:
            said = f"{SigtermStop.stopped} stopped by SIGTERM before it finished: its results are missing or partial"
        print(f"octlightning: {said}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
