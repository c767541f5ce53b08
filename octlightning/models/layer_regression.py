"""Boundary rows per column from a B-scan: SegFormer or U-Net backbones, soft-argmax or pooling heads.

Output contract of every network here (what
:class:`~octlightning.tasks.layer_regression.LayerRegressionTask` trains): for an input ``(B, C, H, W)``
either a dict ``{"rows": (B, L, W_out), "row_logits": (B, L, H, W_out)}`` (soft-argmax head, see
:class:`~octlightning.models.boundary_head.ColumnSoftArgmax`) or a tensor ``(B, L, W_out)`` (pooling
head); rows are float32 fractions of the input height ``H`` (row in input pixels / ``H``, pixel
centres), boundaries top first, columns resampled to ``W_out`` with the resize convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import SegformerConfig, SegformerModel
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

from octlightning.errors import ConfigError
from octlightning.models.boundary_head import ColumnSoftArgmax
from octlightning.models.smp_net import SMPNet

# Mix Transformer encoder sizes of the SegFormer paper (Xie et al. 2021), as in nvidia/mit-b*.
MIT_VARIANTS: dict[str, dict[str, Any]] = {
    "mit-b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "mit-b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "mit-b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "mit-b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "mit-b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "mit-b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}


class SegFormerLayerRegressor(nn.Module):
    """Boundary rows per column from a B-scan with a SegFormer (Mix Transformer) encoder.

    ``head="soft_argmax"`` (default): SegFormer's all-MLP decoder (transformers'
    ``SegformerDecodeHead``) gives one logit map per boundary at 1/4 of the input resolution;
    :class:`~octlightning.models.boundary_head.ColumnSoftArgmax` upsamples it to the input height and
    ``output_width`` columns and returns ``{"rows": (B, L, W_out), "row_logits": (B, L, H, W_out)}``,
    boundaries ordered by construction. This head learns from a random initialisation.

    ``head="pool"`` (the seed's head, kept for comparison; it learns only from pretrained features):
    returns ``(B, L, W_out)``. Each encoder stage is projected to ``head_channels``, averaged over
    height to ``pool_height`` rows and resampled along the width to ``output_width`` columns; the
    stages are concatenated and a 1-D convolutional head (kernel ``kernel_size`` along the columns)
    maps them to one value per boundary and column, started at mid-height.

    Both heads give rows as a *fraction of the input height* (0 = top, 1 = bottom); tasks multiply
    by the height.

    Args:
        num_boundaries: boundaries predicted.
        output_width: columns predicted.
        in_channels: input channels (3 for pretrained backbones fed with replicated grey).
        variant: ``mit-b0`` .. ``mit-b5`` encoder sizes (ignored with ``pretrained``).
        config: further ``SegformerConfig`` fields, overriding the variant (e.g. a tiny encoder).
        pretrained: a local directory saved with ``save_pretrained`` (loaded offline); ``None`` builds
            a randomly initialised encoder.
        head: ``soft_argmax`` or ``pool`` (see above).
        head_channels: width of the head / decoder (``None``: the config's ``decoder_hidden_size``).
        pool_height: (``pool`` head) rows each stage is pooled to (1 = a plain column average).
        kernel_size: (``pool`` head) the head's convolution width along the columns.
        dropout: dropout in the head; with ``> 0`` tasks can sample it at prediction (MC dropout).
    """

    def __init__(
        self,
        num_boundaries: int = 2,
        output_width: int = 512,
        in_channels: int = 3,
        variant: str = "mit-b0",
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        head: Literal["soft_argmax", "pool"] = "soft_argmax",
        head_channels: int | None = None,
        pool_height: int = 1,
        kernel_size: int = 5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            path = Path(pretrained)
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"--model.init_args.net.init_args.pretrained {path}: not a local pretrained SegFormer directory "
                    f"(no config.json); save one with SegformerModel.save_pretrained(...): hub names are not downloaded"
                )
            self.backbone = SegformerModel.from_pretrained(str(path), local_files_only=True, **(config or {}))
            # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode:
            # the encoder's dropout and drop-path would stay off in training.
            self.backbone.train()
            if self.backbone.config.num_channels != in_channels:
                raise ConfigError(
                    f"--model.init_args.net.init_args.pretrained {path}: the pretrained encoder takes "
                    f"{self.backbone.config.num_channels} input channels and the data gives {in_channels} "
                    f"(--data.init_args.in_channels): set it to {self.backbone.config.num_channels}"
                )
        else:
            if variant not in MIT_VARIANTS:
                raise ValueError(f"unknown SegFormer variant {variant!r}; choose one of {sorted(MIT_VARIANTS)}")
            kwargs = {**MIT_VARIANTS[variant], **(config or {}), "num_channels": in_channels}
            self.backbone = SegformerModel(SegformerConfig(**kwargs))
        self.pretrained_encoder = pretrained is not None  # read by FreezeBackbone
        if head not in ("soft_argmax", "pool"):
            raise ValueError(f"unknown head {head!r}; choose soft_argmax or pool")
        cfg = self.backbone.config
        d = head_channels or cfg.decoder_hidden_size
        self.num_boundaries, self.output_width, self.pool_height = num_boundaries, output_width, pool_height
        self.head_kind = head
        if head == "soft_argmax":
            options = {"num_labels": num_boundaries, "decoder_hidden_size": d, "classifier_dropout_prob": dropout}
            decoder_cfg = SegformerConfig(**{**cfg.to_dict(), **options})
            self.decoder = SegformerDecodeHead(decoder_cfg)
            self.soft_argmax = ColumnSoftArgmax(output_width)
            return
        self.project = nn.ModuleList(nn.Conv2d(c, d, 1) for c in cfg.hidden_sizes)
        self.head = nn.Sequential(
            nn.Conv1d(d * len(cfg.hidden_sizes) * pool_height, d, 1),
            nn.BatchNorm1d(d),
            nn.GELU(),
            nn.Conv1d(d, d, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm1d(d),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv1d(d, num_boundaries, 1),
        )
        # Start at mid-height: a fresh network then errs by at most half an image.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.constant_(self.head[-1].bias, 0.5)

    def pooled_features(self, x: Tensor) -> Tensor:
        """``(B, D * stages * pool_height, output_width)`` column features."""
        stages = self.backbone(pixel_values=x, output_hidden_states=True).hidden_states
        columns = []
        for proj, feat in zip(self.project, stages, strict=True):
            # Average over columns when the stage is wider than the output, interpolate when narrower.
            width = min(feat.shape[-1], self.output_width)
            f = F.adaptive_avg_pool2d(proj(feat), (self.pool_height, width))
            f = f.flatten(1, 2)  # pooled rows become channels: they keep coarse vertical position
            if width != self.output_width:
                f = F.interpolate(f, size=self.output_width, mode="linear", align_corners=False)
            columns.append(f)
        return torch.cat(columns, dim=1)

    def forward(self, x: Tensor) -> dict[str, Tensor] | Tensor:
        if self.head_kind == "pool":
            return self.head(self.pooled_features(x))
        stages = self.backbone(pixel_values=x, output_hidden_states=True).hidden_states
        return self.soft_argmax(self.decoder(stages), x.shape[-2])


class UNetLayerRegressor(nn.Module):
    """Boundary rows per column from a B-scan with a U-Net (segmentation_models_pytorch) and soft-argmax.

    The U-Net outputs one logit map per boundary at the input resolution;
    :class:`~octlightning.models.boundary_head.ColumnSoftArgmax` resamples its columns to
    ``output_width`` and returns ``{"rows": (B, L, W_out), "row_logits": (B, L, H, W_out)}`` (rows as a
    fraction of the input height ``H``, boundaries ordered by construction). ``H`` and ``W`` must be
    multiples of 32 (the encoder's stride).

    Args:
        num_boundaries: boundaries predicted.
        output_width: columns predicted.
        in_channels: input channels.
        encoder_name: smp encoder (``resnet18``, ``resnet34``, ...).
        encoder_weights: ``None`` (random initialisation) or a local weights file, as in
            :class:`~octlightning.models.smp_net.SMPNet`.
        decoder_channels: the U-Net decoder's widths, deepest first (smp's default ends at 16).
        dropout: dropout on the decoder output before the boundary logits (MC dropout at predict).
    """

    def __init__(
        self,
        num_boundaries: int = 2,
        output_width: int = 512,
        in_channels: int = 3,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        decoder_channels: list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = list(decoder_channels or [256, 128, 64, 32, 16])
        self.unet = SMPNet(
            "Unet",
            encoder_name,
            encoder_weights,
            in_channels,
            num_classes=num_boundaries,
            arch_kwargs={"decoder_channels": channels, "encoder_depth": len(channels)},
        )
        self.num_boundaries, self.output_width = num_boundaries, output_width
        self.pretrained_encoder = self.unet.pretrained_encoder  # read by FreezeBackbone
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.soft_argmax = ColumnSoftArgmax(output_width)

    @property
    def encoder(self) -> nn.Module:
        """The encoder (what :class:`~octlightning.callbacks.FreezeBackbone` freezes: ``net.encoder``)."""
        return self.unet.encoder

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        model = self.unet.model
        features = model.decoder(model.encoder(x))
        return self.soft_argmax(model.segmentation_head(self.dropout(features)), x.shape[-2])
