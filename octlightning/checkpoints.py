"""Safe loading of weights and checkpoints.

Everything is loaded with ``torch.load(weights_only=True)``: a file crafted to run code when
unpickled is refused instead of executed.
"""

from __future__ import annotations

import pickle
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
