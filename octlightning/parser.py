"""The command-line parser of :class:`~octlightning.cli.OctLightningCLI`: LightningCLI's, with a one-line
answer to a misspelt option (the names that exist) or a value of the wrong type (what the option takes)
instead of the whole usage."""

from __future__ import annotations

import re
import sys
from difflib import get_close_matches
from importlib import import_module

from lightning.pytorch.cli import LightningArgumentParser

from octlightning.links import init_parameters

# jsonargparse's message for a key the chosen class does not take (``--model.init_args.lrr 1e-3``).
_NOT_ACCEPTED = re.compile(r"class_path '([\w.]+)':\s+Option '(\w+)' is not accepted")
_UNRECOGNIZED = re.compile(r"unrecognized arguments:\s+(--[\w.]+)", re.IGNORECASE)
# jsonargparse's messages for a value it cannot take: nested ``Parser key "x":`` lines down to the option,
# then ``Expected a <type>. Got value: v`` (or, for a file option, the problem on the key's own line).
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)":\s*(.*)')
_EXPECTED = re.compile(r"Expected an? (.+?)\. Got value: (.*)")


def misspelt_option_hint(message: str, options: list[str]) -> str | None:
    """One line for a command-line option that nothing takes, with the closest names that exist, or None.

    Covers an argument the configured class does not take (``--model.init_args.lrr``: the class's own
    arguments are searched) and an unknown option (``--trainer.max_epoch``: ``options`` are searched).
    """
    if m := _NOT_ACCEPTED.search(message):
        class_path, name = m.groups()
        module, _, cls_name = class_path.rpartition(".")
        try:
            known = list(init_parameters(getattr(import_module(module), cls_name)))
        except (ImportError, AttributeError, ValueError, TypeError):
            return None
        close = [repr(c) for c in get_close_matches(name, known, n=3, cutoff=0.6)]
        return f"{cls_name} takes no argument {name!r}" + (f"; did you mean {' or '.join(close)}?" if close else "")
    if m := _UNRECOGNIZED.search(message):
        option = m.group(1)
        close = get_close_matches(option, options, n=3, cutoff=0.8)
        return f"unknown option {option}" + (f"; did you mean {' or '.join(close)}?" if close else "")
    return None


def _readable_type(text: str) -> str:
    """``<class 'int'>`` -> ``int``; ``typing.Literal['adam', 'sgd']`` -> ``one of 'adam', 'sgd'``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    if m := re.fullmatch(r"typing\.Literal\[(.*)\]", text):
        return f"one of {m.group(1)}"
    return text


def wrong_value_hint(message: str) -> str | None:
    """One line for a value an option cannot take, naming the option and what it takes, or None.

    jsonargparse answers ``--data.init_args.batch_size abc`` with the usage and a "Does not validate
    against any of the Union subtypes" listing; its first branch holds the option's keys and the
    expected type: ``--data.init_args.batch_size: expected int, got abc``. A missing ``--config`` file:
    ``--config: File does not exist: '...'``.
    """
    keys: list[str] = []
    for line in (raw.strip() for raw in message.splitlines()):
        if m := _PARSER_KEY.match(line):
            keys.append(m.group(1))
            if m.group(2) and not m.group(2).startswith("Does not validate"):
                return f"--{'.init_args.'.join(keys)}: {m.group(2)}"
        elif (m := _EXPECTED.match(line)) and keys and m.group(1) != "<class 'NoneType'>":
            return f"--{'.init_args.'.join(keys)}: expected {_readable_type(m.group(1))}, got {m.group(2)}"
    return None


class OctArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, answering a misspelt option (with the names that exist) or a value of the
    wrong type (with what the option takes) in one line.

    jsonargparse answers ``--model.init_args.lrr 1e-3`` with the whole usage (about 70 lines) and every
    Union member it tried; here it is ``error: SegmentationTask takes no argument 'lrr'; did you mean
    'lr'?`` (exit status 2, as argparse). Abbreviated options are refused (see
    :class:`OctLightningCLI`), so a typo never silently sets another option. ``--model.init_args.optimizer
    adamw2`` is ``error: --model.init_args.optimizer: expected one of 'adam', 'adamw', 'sgd', got adamw2``
    (see :func:`wrong_value_hint`). Other errors are unchanged.
    """

    def error(self, message: str, ex: Exception | None = None):
        hint = misspelt_option_hint(message, list(self._option_string_actions)) or wrong_value_hint(message)
        if hint is not None and self.exit_on_error:
            prog = self.prog.replace(" [options]", "")
            sys.stderr.write(f"error: {hint}\ntip: {prog} --help lists the options; --print_config shows the config\n")
            self.exit(2)
        super().error(f"{hint}\n{message}" if hint else message, ex)
