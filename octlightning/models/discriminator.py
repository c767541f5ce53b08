"""A small convolutional discriminator for adversarial segmentation training."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


class PairDiscriminator(nn.Module):
    """Tells (image, reference mask) pairs from (image, predicted mask) pairs.

    The mask is a per-class probability map ``(B, K, H, W)`` (one-hot for references, softmax or sigmoid
    output for predictions). Strided 4x4 convolutions halve the resolution ``depth`` times; a 3x3
    convolution gives a patch-wise real/fake score map whose mean is the logit of each pair, so any
    image size works.

    Args:
        in_channels: channels of the image (1 for OCT).
        num_classes: channels of the mask (the segmenter's output channels).
        base_channels: width of the first convolution; doubles per level, at most 8 x.
        depth: number of stride-2 convolutions.
        norm: ``instance`` normalisation after every convolution but the first, or ``none``. Batch norm
            is avoided on purpose: real and fake batches pass separately and their batch statistics
            alone would give them away.
        pair: ``concat`` stacks image and mask channels; ``product`` feeds the image multiplied by
            every class map (Luc et al. 2016), which makes the soft/hard difference between predicted
            and reference masks harder to exploit than plain concatenation.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        base_channels: int = 32,
        depth: int = 4,
        norm: Literal["instance", "none"] = "instance",
        pair: Literal["concat", "product"] = "concat",
    ) -> None:
        super().__init__()
        if pair not in ("concat", "product"):
            raise ValueError(f"pair must be 'concat' or 'product', got {pair!r}")
        if norm not in ("instance", "none"):
            raise ValueError(f"norm must be 'instance' or 'none', got {norm!r}")
        self.pair = pair
        self.num_classes = num_classes
        cin = in_channels + num_classes if pair == "concat" else in_channels * num_classes
        layers: list[nn.Module] = []
        for i in range(depth):
            cout = base_channels * 2 ** min(i, 3)
            layers.append(nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1))
            if norm == "instance" and i > 0:
                layers.append(nn.InstanceNorm2d(cout, affine=True))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        layers.append(nn.Conv2d(cin, 1, kernel_size=3, padding=1))
        self.body = nn.Sequential(*layers)

    def pair_input(self, image: Tensor, mask: Tensor) -> Tensor:
        if mask.shape[1] != self.num_classes:
            raise ValueError(f"mask has {mask.shape[1]} channels, the discriminator expects {self.num_classes}")
        if self.pair == "concat":
            return torch.cat([image, mask.to(image.dtype)], dim=1)
        return (image.unsqueeze(2) * mask.to(image.dtype).unsqueeze(1)).flatten(1, 2)

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        """``(B,)`` logits: high for pairs that look like (image, reference)."""
        return self.body(self.pair_input(image, mask)).mean(dim=(1, 2, 3))
