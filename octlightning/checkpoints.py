"""Safe loading of weights and checkpoints.

Everything is loaded with ``torch.load(weights_only=True)``: a file crafted to run code when
unpickled is refused instead of executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from octlightning.errors import ConfigError


class UnsafeCheckpointError(RuntimeError):
    """A weights file holds objects that ``weights_only`` loading refuses."""


def load_state_dict(path: str | Path, key: str | None = None, option: str | None = None) -> dict[str, Tensor]:
    """Load a state dict from ``.pt``/``.pth``/``.ckpt``/``.bin`` or ``.safetensors``.

    Nested checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped; ``key`` picks a
    sub-dictionary explicitly. ``option``: the config option that named the file, for the error.

    Raises:
        ConfigError: no such file (naming ``option``; the CLI prints it as one line).
    """
    path = Path(path)
    if not path.is_file():
        fix = f"; set {option} to a local weights file" if option else ""
        raise ConfigError(f"weights file not found: {path} (= {path.resolve()}){fix}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load, the file holds objects other than tensors and plain "
            f"containers (weights_only=True). Only load weights you trust; re-save them as a plain "
            f"state dict. Detail: {str(err).splitlines()[0]}"
        ) from err
    except RuntimeError as err:
        raise ValueError(f"{path}: not a readable PyTorch weights file ({err})") from err
    if key is not None:
        obj = obj[key]
    else:
        for candidate in ("state_dict", "model", "module", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(candidate), dict):
                obj = obj[candidate]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dictionary of tensors (a state dict)")
    return obj


def require_torch_file(path: str | Path, option: str = "--ckpt_path") -> None:
    """Raise :class:`ConfigError` naming ``option`` when ``path`` is not a file ``torch.save`` wrote: a zip
    archive since torch 1.6, a pickle (first byte ``0x80``) before. Otherwise loading it ends in an
    unpickling traceback (LightningCLI reads a ``--ckpt_path``'s hyperparameters while parsing)."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as fh:
        if fh.read(1) != b"\x80":
            raise ConfigError(f"{option} {path}: not a checkpoint (not a file torch.save wrote)")


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def require_checkpoint_fits(path: str | Path, model: torch.nn.Module, hint: str = "") -> None:
    """Check that the Lightning checkpoint ``path`` was written by ``model``'s task and network, before
    anything is run: otherwise Lightning fails at its load with a traceback listing every weight name.

    Compares the task class the checkpoint records (``hyper_parameters._class_path``, written by
    LightningCLI) and the names and shapes of its ``state_dict`` with ``model``'s. A file that
    ``weights_only`` loading refuses, or a module with ``strict_loading = False``, is left to Lightning.

    Raises:
        ConfigError: naming ``--ckpt_path``, what the checkpoint holds and what this config builds, then
            ``hint`` (e.g. the config of the run the checkpoint came from).
    """
    if not zipfile.is_zipfile(path):
        require_torch_file(path)
        return  # a pre-1.6 torch file: Lightning reads it, or says why not
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError):  # weights_only refused it: left to Lightning's own loading
        return
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"--ckpt_path {path}: not a Lightning checkpoint (no state_dict){hint}")
    written_by = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if written_by and written_by != _class_path(model):
        raise ConfigError(
            f"--ckpt_path {path}: a checkpoint of {written_by}, but this config's model is {_class_path(model)}{hint}"
        )
    if not getattr(model, "strict_loading", True):
        return
    theirs = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, Tensor)}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    reshaped = [f"{k} {theirs[k]} here {ours[k]}" for k in ours if k in theirs and theirs[k] != ours[k]]
    if missing or unexpected or reshaped:
        parts = [
            f"{len(names)} {what} (e.g. {', '.join(names[:2])})"
            for names, what in (
                (missing, "weights of this network not in it"),
                (unexpected, "weights this network lacks"),
                (reshaped, "weights of another shape"),
            )
            if names
        ]
        raise ConfigError(
            f"--ckpt_path {path}: its network is not the one this config builds: {'; '.join(parts)}{hint}"
        )
