"""Any segmentation_models_pytorch architecture, with encoder weights from a local file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
from torch import Tensor, nn

from octlightning.checkpoints import load_state_dict
from octlightning.errors import ConfigError

# Prefixes under which an encoder's keys appear in the files people have: a bare encoder/torchvision
# state dict, an smp model, an SMPNet, a SegmentationTask checkpoint, DataParallel/DDP wrappers.
_ENCODER_PREFIXES = ("", "encoder.", "model.encoder.", "net.model.encoder.", "module.", "backbone.")


def _looks_like_path(weights: str) -> bool:
    """A local file rather than an smp hub name such as ``imagenet``."""
    return Path(weights).is_file() or Path(weights).suffix != "" or os.sep in weights or "/" in weights


def load_encoder_weights(
    encoder: nn.Module, path: str | Path, option: str | None = None, name: str | None = None
) -> None:
    """Load a local weights file into an smp encoder; every encoder tensor must be given.

    Keys are matched under the prefix (see ``_ENCODER_PREFIXES``) that covers most encoder keys;
    extra keys (a classifier head, the decoder of a whole model) are ignored. A file that matches no
    key, leaves encoder tensors unset, or has tensors of the wrong shape is a :class:`ConfigError` naming
    ``option`` (the config option that named the file), the file and, where given, ``name`` (the smp
    ``encoder_name`` the file should hold).
    """
    state = load_state_dict(path, option=option)
    where = f"{option} {path}" if option else str(path)
    own = encoder.state_dict()

    def under(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own}

    best = max((under(p) for p in _ENCODER_PREFIXES), key=len)
    if not best:
        raise ConfigError(
            f"{where}: no key matches the {type(encoder).__name__} encoder "
            f"(file keys start {list(state)[:3]}, encoder keys start {list(own)[:3]})"
        )
    missing = [k for k in own if k not in best and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(
            f"{where}: {len(missing)} of {len(own)} encoder tensors are not in the file "
            f"(e.g. {missing[:3]}): the weights of another encoder? Give a file of this one"
            f"{f' ({name})' if name else ''}, or set --model.init_args.net.init_args.encoder_name to the file's"
        )
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in best.items() if v.shape != own[k].shape]
    if wrong:
        raise ConfigError(f"{where}: tensors of the wrong shape for this encoder: {wrong[:3]}")
    encoder.load_state_dict(best, strict=False)


class SMPNet(nn.Module):
    """Wraps ``smp.create_model`` so that a config names the architecture and encoder by string.

    Args:
        arch: smp architecture name (``Unet``, ``UnetPlusPlus``, ``DeepLabV3Plus``, ``FPN``, ...).
        encoder_name: smp encoder (``resnet34``, ``resnet50``, ...).
        encoder_weights: ``None`` (random init, the default: no download ever happens),
            a path to a local state-dict file for the encoder (``.pth``/``.pt``/``.safetensors``;
            torchvision, smp or octlightning checkpoints), or a hub name such as ``"imagenet"``,
            which smp downloads and so needs the network (and ``HF_HUB_OFFLINE=0``).
        in_channels: input channels; local RGB weights are adapted to other ``in_channels`` the way
            smp adapts its own.
        num_classes: output channels (1 = binary).
        arch_kwargs: further arguments of the architecture, e.g. for DeepLabV3Plus
            ``{"decoder_atrous_rates": [6, 12, 18], "encoder_output_stride": 16}``. (A config cannot
            reach ``**kwargs``, hence this dictionary.)
        **kwargs: the same as ``arch_kwargs``, for Python callers.
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        in_channels: int = 3,
        num_classes: int = 1,
        arch_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        options = {**(arch_kwargs or {}), **kwargs}
        local = encoder_weights is not None and _looks_like_path(encoder_weights)
        hub = None if local else encoder_weights
        try:
            self.model = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=hub,
                # Local weights are RGB: load them into a 3-channel encoder first, then adapt.
                in_channels=3 if local else in_channels,
                classes=num_classes,
                **options,
            )
        except OSError as err:  # the hub is unreachable (offline by default, see octlightning.env)
            raise ConfigError(
                f"--model.init_args.net.init_args.encoder_weights {hub}: hub weights must be downloaded from the "
                f"Hugging Face hub, which failed ({type(err).__name__}); give a local weights file (a torchvision "
                f"or smp {encoder_name} state dict), or go online and set HF_HUB_OFFLINE=0"
            ) from err
        if local:
            load_encoder_weights(
                self.model.encoder, encoder_weights, "--model.init_args.net.init_args.encoder_weights", encoder_name
            )
            self.model.encoder.set_in_channels(in_channels, pretrained=True)
        # Read by FreezeBackbone: freezing a random encoder teaches nothing.
        self.pretrained_encoder = encoder_weights is not None
        # Inputs must be divisible by this (smp checks it; DeepLabV3Plus: 16 by default).
        self.stride: int = int(self.model.encoder.output_stride)

    @property
    def encoder(self) -> nn.Module:
        """The pretrained part: what backbone freezing (:class:`~octlightning.callbacks.FreezeBackbone`) acts on."""
        return self.model.encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
