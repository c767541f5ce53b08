"""Any segmentation_models_pytorch architecture, with encoder weights from a local file."""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
from torch import Tensor, nn

from octlightning.checkpoints import load_state_dict


class SMPNet(nn.Module):
    """Wraps ``smp.create_model`` so that a config names the architecture and encoder by string.

    Args:
        arch: smp architecture name (``Unet``, ``UnetPlusPlus``, ``DeepLabV3Plus``, ``FPN``, ...).
        encoder_name: smp encoder (``resnet34``, ``resnet50``, ...).
        encoder_weights: ``None`` (random init, the default: no download ever happens),
            a path to a local state-dict file for the encoder (``.pth``/``.pt``/``.safetensors``),
            or a hub name such as ``"imagenet"``, which smp downloads and so needs the network.
        in_channels, classes: input channels and output channels (1 = binary).
        **kwargs: passed to the architecture (e.g. ``decoder_atrous_rates`` for DeepLabV3Plus).
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        in_channels: int = 3,
        classes: int = 1,
        **kwargs,
    ) -> None:
        super().__init__()
        local = encoder_weights is not None and Path(encoder_weights).suffix != ""
        self.model = smp.create_model(
            arch,
            encoder_name=encoder_name,
            encoder_weights=None if local else encoder_weights,
            in_channels=in_channels,
            classes=classes,
            **kwargs,
        )
        if local:
            state = load_state_dict(encoder_weights)
            state = {k.removeprefix("encoder."): v for k, v in state.items()}
            missing, unexpected = self.model.encoder.load_state_dict(state, strict=False)
            matched = len(state) - len(unexpected)
            if matched == 0:
                raise ValueError(
                    f"{encoder_weights}: no key matches the {encoder_name} encoder (first keys: {list(state)[:3]})"
                )
        self.stride = 32 if arch.lower().startswith("deeplab") else 2 ** kwargs.get("encoder_depth", 5)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
