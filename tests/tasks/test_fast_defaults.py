"""The fast options are applied (CPU-checkable part of the performance defaults; no timings here)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from octlightning.cli import default_precision, run_cli
from octlightning.data import mask_folder
from octlightning.data.base import SampleCache
from octlightning.data.mask_folder import MaskFolderDataModule
from octlightning.models.unet import UNet
from octlightning.tasks.segmentation import SegmentationTask
from tests.conftest import REPO, TINY_VESSEL


def test_channels_last_is_applied_to_the_network_and_its_inputs_on_a_gpu(monkeypatch):
    task = SegmentationTask(UNet(3, 1, base_channels=4, depth=2), channels_last=True)
    monkeypatch.setattr(task, "target_device", lambda: torch.device("cuda", 0))  # what a GPU trainer reports
    task.setup("fit")
    conv = task.net.encoder[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = task.prepare_input(torch.randn(2, 3, 16, 16))
    assert x.is_contiguous(memory_format=torch.channels_last)
    plain = SegmentationTask(UNet(3, 1, base_channels=4, depth=2), channels_last=False)
    monkeypatch.setattr(plain, "target_device", lambda: torch.device("cuda", 0))
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


def _fast_dev_fit(drive_root, root, *extra: str):
    return run_cli([
        "fit", "--config", str(REPO / "hparams" / "vessel_unet.json"), "--data.init_args.root", str(drive_root),
        *TINY_VESSEL, "--trainer.default_root_dir", str(root), "--trainer.fast_dev_run", "true", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def cpu_fit(drive_root, tmp_path_factory):
    """One fast_dev_run fit of the (shrunk) vessel recipe on the CPU, for the checks below."""
    return _fast_dev_fit(drive_root, tmp_path_factory.mktemp("runs"))


def test_null_precision_resolves_to_full_precision_on_cpu(cpu_fit):
    assert default_precision() == "32-true"  # bf16-mixed only on a bf16-capable GPU
    assert cpu_fit.trainer.precision == "32-true"
    opt = cpu_fit.trainer.optimizers[0]
    recipe = json.loads((REPO / "hparams" / "vessel_unet.json").read_text())["model"]["init_args"]
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == recipe["lr"]


def test_channels_last_is_not_applied_when_training_on_the_cpu(cpu_fit):
    assert cpu_fit.model.channels_last  # the recipe asks for it ...
    assert cpu_fit.model.net.encoder[0][0].weight.is_contiguous()  # ... but NCHW is faster on the CPU


# ----------------------------------------------------------------------------- decoded-sample cache
def test_sample_cache_keeps_what_fits_the_budget_read_only():
    cache = SampleCache(max_mb=1)
    loads = []

    def load(n: int):
        loads.append(n)
        return np.zeros(n, dtype=np.uint8), None

    first = cache.get("a", lambda: load(600_000))
    assert cache.get("a", lambda: load(600_000)) is first and loads == [600_000]
    with pytest.raises(ValueError, match="read-only"):
        first[0][0] = 1  # a transform writing into a cached sample would change every later epoch
    cache.get("b", lambda: load(600_000))  # over the budget: returned, not kept
    cache.get("b", lambda: load(600_000))
    assert loads == [600_000] * 3 and len(cache) == 1 and cache.bytes == 600_000


@pytest.mark.parametrize("cache_mb, decodes_per_epoch", [(1024, (4, 0)), (0, (4, 4))])
def test_training_images_are_decoded_once_and_still_augmented_every_epoch(
    tmp_path, monkeypatch, cache_mb, decodes_per_epoch
):
    from tests.fixtures.isic import write_isic_layout

    root = write_isic_layout(tmp_path, with_test=False)
    dm = MaskFolderDataModule(
        str(root), batch_size=2, num_workers=0, image_size=32, val_fraction=0.34, cache_mb=cache_mb
    )
    dm.setup("fit")
    decoded = []
    real_read = mask_folder.read_image
    monkeypatch.setattr(mask_folder, "read_image", lambda path, mode: decoded.append(path) or real_read(path, mode))
    epochs = []
    for _ in range(2):
        before = len(decoded)
        epochs.append({s["id"]: s["image"] for s in (dm.train_set[i] for i in range(len(dm.train_set)))})
        assert len(decoded) - before == decodes_per_epoch[len(epochs) - 1]
    assert any(not torch.equal(epochs[0][k], epochs[1][k]) for k in epochs[0]), "augmentation is redrawn"


def test_progress_bar_reads_the_loss_every_tenth_step_not_every_step(drive_root, tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    cli = _fast_dev_fit(drive_root, tmp_path, "--trainer.enable_progress_bar", "true")
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 10
