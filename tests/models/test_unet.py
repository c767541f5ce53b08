import pytest
import torch

from octlightning.models.unet import UNet


@pytest.mark.parametrize("depth,out", [(2, 1), (4, 4)])
def test_unet_keeps_spatial_size(depth, out):
    net = UNet(
        in_channels=1,
        num_classes=out,
        base_channels=4,
        depth=depth,
        dropout=0.1,
        spatial_dropout=True,
        first_kernel_size=7,
    )
    x = torch.randn(2, 1, 32, 48)
    assert net(x).shape == (2, out, 32, 48)


def test_unet_rejects_inputs_not_divisible_by_its_stride():
    net = UNet(base_channels=4, depth=3)
    with pytest.raises(ValueError, match="not divisible by 8"):
        net(torch.randn(1, 3, 30, 32))
