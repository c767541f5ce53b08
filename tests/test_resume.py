"""Every training configuration resumes from ``last.ckpt`` and ends like the run that was never stopped.

The table crosses the callbacks that change the optimiser or the loop (FreezeBackbone, which adds the
encoder's parameter group at its unfreeze epoch, and early stopping), the LR schedules (none, step,
cosine with warm-up) and the three kinds of task (segmentation, adversarial with two optimisers, layer
regression). Each case trains 3 tiny epochs once without a stop, and once stopped (by an exception,
as a kill would) when 2 epochs are saved, past the unfreeze epoch as an ISIC run killed late is, then
resumed from its ``last.ckpt``; both must end at the same step with the same parameter groups, learning
rates and trainable parameters. (Before the fix, the cosine cases with FreezeBackbone failed with
``ValueError: zip() argument 2 is longer than argument 1`` in LambdaLR.)
"""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

import octlightning.callbacks as callbacks_module
from octlightning.callbacks import FreezeBackbone, LastCheckpoint
from octlightning.data.fundus import FundusVesselDataModule
from octlightning.data.oct_layers import OCTLayerDataModule
from octlightning.loggers import CSVLogger
from octlightning.models.discriminator import PairDiscriminator
from octlightning.models.layer_regression import SegFormerLayerRegressor
from octlightning.models.unet import UNet
from octlightning.tasks.adversarial import AdversarialTask
from octlightning.tasks.layer_regression import LayerRegressionTask
from octlightning.tasks.segmentation import SegmentationTask
from tests.fixtures.oct_layers import write_layer_file

EPOCHS = 3
STOP_AFTER = 2  # epochs saved when the first run stops: past the unfreeze epoch (1)
TINY_SEGFORMER = {"hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 1, 1]}


class _Stopped(Exception):
    pass


class StopAfterEpochs(L.Callback):
    """Ends training abruptly (an exception, as a kill would) once ``epochs`` epochs are in ``last.ckpt``."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # LastCheckpoint saved the first `epochs` epochs when epoch `epochs` started.
        if trainer.current_epoch == self.epochs:
            raise _Stopped


def _datamodule(task: str, drive_root: Path, h5: Path) -> L.LightningDataModule:
    if task == "layer_regression":
        return OCTLayerDataModule(
            str(h5), batch_size=2, num_workers=0, in_channels=1, image_size=[32, 32], output_width=16,
            val_fraction=0.2, test_fraction=0.2, augment=False,
        )  # fmt: skip
    return FundusVesselDataModule(
        str(drive_root), batch_size=2, num_workers=0, patch_size=16, patches_per_image=1, augment=False
    )


def _task(task: str, scheduler: str, dm: L.LightningDataModule) -> L.LightningModule:
    torch.manual_seed(0)
    common = {"lr": 1e-3, "scheduler": scheduler, "warmup_epochs": 1, "channels_last": False}
    if task == "layer_regression":
        net = SegFormerLayerRegressor(
            num_boundaries=dm.num_boundaries, output_width=dm.output_width, in_channels=1, config=TINY_SEGFORMER
        )
        return LayerRegressionTask(net, boundary_names=dm.boundary_names, **common)
    net = UNet(3, 1, base_channels=4, depth=2)
    if task == "adversarial":
        disc = PairDiscriminator(in_channels=3, num_classes=1, base_channels=4, depth=2)
        return AdversarialTask(net, disc, num_classes=1, **common)
    return SegmentationTask(net, num_classes=1, **common)


def _callbacks(kind: str, task: str, model: L.LightningModule) -> list[L.Callback]:
    out: list[L.Callback] = []
    if kind == "freeze":
        backbone = "net.backbone" if task == "layer_regression" else "net.encoder"
        kwargs = {"unfreeze_at_epoch": 1, "lr_factor": 0.1, "backbone": backbone}
        if "only_if_pretrained" in inspect.signature(FreezeBackbone).parameters:
            kwargs["only_if_pretrained"] = False  # these tiny encoders are random: freeze them anyway
        out.append(FreezeBackbone(**kwargs))
    if kind == "early_stopping":
        # patience large enough to train every epoch: the state must still survive the stop
        stopping = getattr(callbacks_module, "WarmupEarlyStopping", None)
        if stopping is not None:
            out.append(stopping(model.monitor, patience=EPOCHS + 1))
        else:
            out.append(EarlyStopping(model.monitor, mode=model.monitor_mode, patience=EPOCHS + 1))
    return out


def _fit(task, kind, scheduler, drive_root, h5, run: Path, stop: bool, resume: bool) -> L.Trainer:
    dm = _datamodule(task, drive_root, h5)
    model = _task(task, scheduler, dm)
    extra = [StopAfterEpochs(STOP_AFTER)] if stop else []
    trainer = L.Trainer(
        default_root_dir=str(run), max_epochs=EPOCHS, limit_train_batches=1, limit_val_batches=1,
        accelerator="cpu", devices=1, logger=CSVLogger(save_dir=str(run.parent), name="", version=run.name),
        callbacks=[*_callbacks(kind, task, model), LastCheckpoint(every_s=0), *extra],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )  # fmt: skip
    ckpt = str(run / "checkpoints" / "last.ckpt") if resume else None
    if stop:
        with pytest.raises(_Stopped):
            trainer.fit(model, dm, ckpt_path=ckpt)
    else:
        trainer.fit(model, dm, ckpt_path=ckpt)
    return trainer


def _state(trainer: L.Trainer) -> dict:
    return {
        "global_step": trainer.global_step,
        "groups": [[len(g["params"]) for g in opt.param_groups] for opt in trainer.optimizers],
        "lr": [[round(g["lr"], 12) for g in opt.param_groups] for opt in trainer.optimizers],
        "requires_grad": sum(p.requires_grad for p in trainer.lightning_module.parameters()),
    }


@pytest.fixture(scope="module")
def oct_h5(tmp_path_factory) -> Path:
    return write_layer_file(tmp_path_factory.mktemp("oct") / "layers.h5")


CASES = list(
    itertools.product(
        ["segmentation", "adversarial", "layer_regression"], ["freeze", "early_stopping"], ["none", "step", "cosine"]
    )
)


@pytest.mark.parametrize(("task", "kind", "scheduler"), CASES, ids=["-".join(c) for c in CASES])
def test_a_stopped_run_resumes_and_ends_like_the_uninterrupted_one(task, kind, scheduler, drive_root, oct_h5, tmp_path):
    clean = _state(_fit(task, kind, scheduler, drive_root, oct_h5, tmp_path / "clean", stop=False, resume=False))
    stopped = tmp_path / "stopped"
    _fit(task, kind, scheduler, drive_root, oct_h5, stopped, stop=True, resume=False)
    saved = torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == STOP_AFTER, "last.ckpt holds the epochs before the stop, the unfreeze epoch among them"
    resumed = _state(_fit(task, kind, scheduler, drive_root, oct_h5, stopped, stop=False, resume=True))
    assert resumed == clean, json.dumps({"resumed": resumed, "uninterrupted": clean})
    if kind == "freeze":
        assert len(clean["groups"][0]) == 2, "the encoder's group was added at the unfreeze epoch"
