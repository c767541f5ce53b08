"""What the data determines, linked into the model config: class count and names, input channels,
boundaries and output width are typed once, in the data.

:class:`~octlightning.cli.OctLightningCLI` calls :func:`link_data_to_model` once the DataModule is
built and before the model is; it walks the whole model config (the task and any network nested in
it), so any task or network that names its arguments like the DataModule's attributes is filled.
"""

from __future__ import annotations

import inspect
from importlib import import_module
from typing import Any

from octlightning.errors import ConfigError

# What the data determines: wherever a task or network in the model config (at any depth) takes an
# argument of one of these names, the CLI gives it the DataModule's value (typed once, in the data). A
# config that sets one to another value fails before anything is built (ConfigError naming both).
DATA_DETERMINES = ("in_channels", "num_classes", "class_names", "num_boundaries", "boundary_names", "output_width")
# Model arguments the data only suggests: filled from the DataModule attribute when the config leaves
# them unset (the evaluation tile defaults to the training patch).
DATA_SUGGESTS = {"sliding_window": "patch_size"}


_NOT_TAKEN = object()


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named ``__init__`` arguments of ``cls`` and of the base classes its ``**kwargs`` pass to (what
    jsonargparse accepts for it), the subclass's first."""
    found: dict[str, inspect.Parameter] = {}
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())
        for p in params[1:]:  # after self
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found


def _default(cls: type, name: str) -> Any:
    """The default of argument ``name`` of ``cls`` (see :func:`init_parameters`): ``inspect.Parameter.empty``
    for a required argument, ``_NOT_TAKEN`` where the class does not take it."""
    parameter = init_parameters(cls).get(name)
    return _NOT_TAKEN if parameter is None else parameter.default


def link_data_to_model(node: Any, datamodule: Any, where: str = "model") -> None:
    """Fill the model config ``node`` (a jsonargparse Namespace or a plain dict) in place with what
    ``datamodule`` determines.

    Walks every ``class_path``/``init_args`` pair under ``node``. An argument named in
    :data:`DATA_DETERMINES` gets the DataModule's value (a DataModule attribute that is ``None`` leaves
    it alone); one named in :data:`DATA_SUGGESTS` gets it only while unset.

    Raises:
        ConfigError: the config sets a determined argument to a value other than its class default and
            the data's (message names the key and both values).
    """
    if isinstance(node, list):
        for i, item in enumerate(node):
            link_data_to_model(item, datamodule, f"{where}[{i}]")
        return
    if not hasattr(node, "get") or node.get("class_path") is None or node.get("init_args") is None:
        return
    module, _, name = str(node["class_path"]).rpartition(".")
    cls = getattr(import_module(module), name)
    args = node["init_args"]
    for key in DATA_DETERMINES:
        value = getattr(datamodule, key, None)
        accepted = key in args or _default(cls, key) is not _NOT_TAKEN
        if not accepted or value is None:
            continue
        given = args.get(key)
        if given is not None and _plain(given) != _plain(_default(cls, key)) and _plain(given) != _plain(value):
            raise ConfigError(
                f"{where}.init_args.{key} is {_plain(given)!r} in the config, but the data "
                f"({type(datamodule).__name__} at {getattr(datamodule, 'root', '?')}) has {key} = {_plain(value)!r}; "
                f"remove it from the config (the data sets it) or use data that matches it"
            )
        args[key] = _plain(value)
    for key, attribute in DATA_SUGGESTS.items():
        value = getattr(datamodule, attribute, None)
        if key in args and args[key] is None and value is not None:
            args[key] = _plain(value)
    for key, value in list(args.items() if isinstance(args, dict) else vars(args).items()):
        link_data_to_model(value, datamodule, f"{where}.init_args.{key}")


def _plain(value: Any) -> Any:
    """Tuples as lists, so that a config's list and a DataModule's tuple compare equal."""
    return list(value) if isinstance(value, tuple) else value
