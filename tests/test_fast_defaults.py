"""The fast options are applied (CPU-checkable part of the performance defaults; no timings here)."""

from __future__ import annotations

import warnings

import torch

from octlightning.cli import default_precision, run_cli
from octlightning.models.unet import UNet
from octlightning.tasks.segmentation import SegmentationTask
from tests.conftest import REPO, TINY_VESSEL


def test_channels_last_is_applied_to_the_network_and_its_inputs():
    task = SegmentationTask(UNet(3, 1, base_channels=4, depth=2), channels_last=True)
    task.setup("fit")
    conv = task.net.encoder[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = task.prepare_input(torch.randn(2, 3, 16, 16))
    assert x.is_contiguous(memory_format=torch.channels_last)
    plain = SegmentationTask(UNet(3, 1, base_channels=4, depth=2), channels_last=False)
    plain.setup("fit")
    assert plain.net.encoder[0][0].weight.is_contiguous()


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("backend compiler failed: unsupported op")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    task = SegmentationTask(UNet(3, 1, base_channels=4, depth=2), compile=True, channels_last=False)
    task.setup("fit")
    x = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = task(x)
    assert out.shape == (1, 1, 16, 16)
    assert any("torch.compile failed" in str(w.message) for w in caught)
    assert task._forward_impl is None  # later steps go straight to eager


def test_null_precision_resolves_to_full_precision_on_cpu(drive_root, tmp_path):
    assert default_precision() == "32-true"  # bf16-mixed only on a bf16-capable GPU
    cli = run_cli([
        "fit", "--config", str(REPO / "hparams" / "vessel_unet.json"), "--data.init_args.root", str(drive_root),
        *TINY_VESSEL, "--trainer.default_root_dir", str(tmp_path), "--trainer.fast_dev_run", "true",
    ])  # fmt: skip
    assert cli.trainer.precision == "32-true"
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-4
