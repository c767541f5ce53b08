"""Dataset converters: ``octlightning convert <converter> ...`` (or ``python -m octlightning.convert``).

Each converter is a module here with ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; adding one is a module plus a line in :data:`CONVERTERS`. Converters write the
on-disk formats through :mod:`octlightning.data.formats`, so what they write is what the DataModules
read.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from octlightning.errors import DataError

# subcommand -> module; imported only when the command line is parsed (h5py, PIL, torch are slow to load).
CONVERTERS = {
    "h5-to-mirage": "octlightning.conversion.h5_to_mirage",
    "synthetic": "octlightning.conversion.synthetic",
}


def build_parser(prog: str = "octlightning convert") -> argparse.ArgumentParser:
    """The ``convert`` command line: one subcommand per converter, each with its own ``--help``."""
    parser = argparse.ArgumentParser(prog=prog, description="Convert datasets into the layouts octlightning reads.")
    sub = parser.add_subparsers(dest="converter", required=True, metavar="CONVERTER")
    for name, module_name in CONVERTERS.items():
        module = importlib.import_module(module_name)
        conv = sub.add_parser(
            name, help=module.HELP, description=module.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(conv)
        conv.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None, prog: str = "octlightning convert") -> int:
    """Run one converter from the command line ``argv``; returns the exit status (1 with a message on
    stderr for bad input data or an output folder that is not empty)."""
    args = build_parser(prog).parse_args(argv)
    try:
        return int(args.run(args))
    except (DataError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
