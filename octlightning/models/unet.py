"""A U-Net written out (Ronneberger et al. 2015), configurable for the vessel and RETOUCH recipes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from octlightning.errors import ConfigError


class ConvBlock(nn.Sequential):
    """Two convolutions, each followed by (optional) batch norm and ReLU, then optional dropout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        batch_norm: bool = True,
        dropout: float = 0.0,
        spatial_dropout: bool = False,
        first_kernel_size: int = 3,
    ) -> None:
        layers: list[nn.Module] = []
        for cin, k in ((in_channels, first_kernel_size), (out_channels, 3)):
            layers.append(nn.Conv2d(cin, out_channels, k, padding=k // 2, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout) if spatial_dropout else nn.Dropout(dropout))
        super().__init__(*layers)


class UNet(nn.Module):
    """Encoder-decoder with skip connections.

    Args:
        in_channels: image channels (3 for RGB fundus, 1 for OCT).
        num_classes: 1 for binary (sigmoid) output, else the number of classes (softmax).
        base_channels: width of the first level; level ``i`` has ``base_channels * 2**i``.
        depth: number of down-sampling steps; inputs must be divisible by ``2**depth``
            (DataModules pad to :attr:`stride`).
        batch_norm: batch norm after every convolution.
        dropout: dropout after each block of the encoder bottom half and the bottleneck.
        spatial_dropout: use channel-wise ``Dropout2d`` (the RETOUCH recipe) instead of ``Dropout``.
        first_kernel_size: kernel of the very first convolution (7 in the RETOUCH recipe).
        upsample: ``"transpose"`` (learned) or ``"bilinear"``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        base_channels: int = 64,
        depth: int = 4,
        batch_norm: bool = True,
        dropout: float = 0.0,
        spatial_dropout: bool = False,
        first_kernel_size: int = 3,
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ConfigError(f"UNet depth (net init_args.depth) must be >= 1, got {depth}")
        if upsample not in ("transpose", "bilinear"):
            raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {upsample!r}")
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths[:-1]):
            # Dropout only in the deeper half, as in the published U-Net.
            drop = dropout if i >= depth // 2 else 0.0
            k = first_kernel_size if i == 0 else 3
            self.encoder.append(ConvBlock(cin, w, batch_norm, drop, spatial_dropout, k))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], batch_norm, dropout, spatial_dropout)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for w_deep, w in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            if upsample == "transpose":
                self.up.append(nn.ConvTranspose2d(w_deep, w, kernel_size=2, stride=2))
            else:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                        nn.Conv2d(w_deep, w, kernel_size=1),
                    )
                )
            self.decoder.append(ConvBlock(2 * w, w, batch_norm))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    @property
    def stride(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"UNet input {h}x{w} is not divisible by {self.stride} (2**depth); pad the input")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)
