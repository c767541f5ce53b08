"""One contract, every DataModule: shared argument names, what the model must agree with, the sample
dict of `octlightning.data.sample.Sample`, disjoint splits, and a DataError that names the file.

Adding a DataModule means adding one entry to DATAMODULES (its fixture writes the real on-disk layout).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from octlightning.data.base import BaseDataModule
from octlightning.data.fundus import FundusVesselDataModule
from octlightning.data.mask_folder import MaskFolderDataModule
from octlightning.data.oct_layers import OCTLayerDataModule
from octlightning.data.oct_semseg import OCTSemSegDataModule
from octlightning.data.retouch import RetouchDataModule
from octlightning.data.sample import Sample
from octlightning.errors import DataError
from tests.fixtures.isic import write_isic_layout
from tests.fixtures.mirage import write_mirage_layout
from tests.fixtures.oct_layers import H, W, write_layer_file
from tests.fixtures.retouch import write_retouch_layout

SHARED = ["root", "batch_size", "eval_batch_size", "num_workers", "seed", "val_fraction", "test_fraction",
          "predict_dir", "in_channels", "cache_mb"]  # fmt: skip


def _fundus(tmp: Path, drive_root: Path):
    return FundusVesselDataModule, str(drive_root), {}


def _mask_folder(tmp: Path, drive_root: Path):
    return MaskFolderDataModule, str(write_isic_layout(tmp / "isic")), {"image_size": 32, "val_fraction": 0.3}


def _oct_layers(tmp: Path, drive_root: Path):
    args = {"image_size": [H, W], "output_width": W, "val_fraction": 1, "test_fraction": 1, "augment": False}
    return OCTLayerDataModule, str(write_layer_file(tmp / "layers.h5")), args


def _oct_semseg(tmp: Path, drive_root: Path):
    root = write_mirage_layout(tmp / "mirage", ["Background", "Retina", "Fluid"], [0, 128, 255])
    return OCTSemSegDataModule, str(root), {"pad_to": 16}


def _retouch(tmp: Path, drive_root: Path):
    args = {"cache_dir": str(tmp / "cache"), "patch_size": [32, 32], "patches_per_epoch": 4, "pad_to": 16}
    return RetouchDataModule, str(write_retouch_layout(tmp / "retouch")), args


# name -> fixture writing the real layout: (DataModule class, root, extra arguments)
DATAMODULES: dict[str, Callable[[Path, Path], tuple[type, str, dict]]] = {
    "fundus": _fundus,
    "mask_folder": _mask_folder,
    "oct_layers": _oct_layers,
    "oct_semseg": _oct_semseg,
    "retouch": _retouch,
}


@pytest.fixture(params=list(DATAMODULES))
def datamodule(request, tmp_path, drive_root) -> BaseDataModule:
    cls, root, extra = DATAMODULES[request.param](tmp_path, drive_root)
    return cls(root=root, batch_size=2, num_workers=0, seed=3, **extra)


def test_every_datamodule_takes_the_shared_arguments_under_the_same_names():
    classes = BaseDataModule.__subclasses__()  # every DataModule imported here, without a second list to keep
    assert {FundusVesselDataModule, MaskFolderDataModule, OCTLayerDataModule, OCTSemSegDataModule,
            RetouchDataModule} <= set(classes)  # fmt: skip
    for cls in classes:
        assert list(inspect.signature(cls).parameters)[: len(SHARED)] == SHARED, cls.__name__


def test_samples_splits_and_what_the_model_must_agree_with(datamodule):
    dm = datamodule
    assert dm.in_channels in (1, 3)
    if isinstance(dm, OCTLayerDataModule):
        assert dm.num_boundaries >= 1 and len(dm.boundary_names) == dm.num_boundaries and dm.output_width
    else:
        assert dm.num_classes >= 1 and len(dm.class_names) == (1 if dm.num_classes == 1 else dm.num_classes - 1)
    dm.setup("fit")
    dm.setup("test")
    ids: dict[str, set[str]] = {}
    groups: dict[str, set[str]] = {}
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        assert len(dataset) > 0, split
        samples = [dataset[i] for i in range(len(dataset))]
        for sample in samples:
            assert set(sample) <= set(Sample.__annotations__), set(sample) - set(Sample.__annotations__)
            assert {"image", "id"} <= set(sample)
            image = sample["image"]
            assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == dm.in_channels
            assert isinstance(sample["id"], str)
        if split != "train":  # training sets may draw several patches of one image
            assert len({s["id"] for s in samples}) == len(samples), f"{split} ids are not unique"
        ids[split] = {s["id"] for s in samples}
        groups[split] = {str(s.get("subject", s.get("volume", s["id"]))) for s in samples}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not groups[a] & groups[b], f"{a} and {b} share {groups[a] & groups[b]}"
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1] == dm.in_channels
    dm.teardown("fit")


def test_a_missing_dataset_is_a_data_error_naming_it_and_the_option(datamodule, tmp_path):
    missing = tmp_path / "no_such_dataset"
    dm = type(datamodule)(**{**datamodule.hparams, "root": str(missing)})
    with pytest.raises(DataError, match="no_such_dataset.*not found.*--data.init_args.root"):
        dm.setup("fit")
    dm = type(datamodule)(**{**datamodule.hparams, "test_dir": str(missing)})
    with pytest.raises(DataError, match="no_such_dataset.*not found.*--data.init_args.test_dir"):
        dm.setup("test")


# Every annotated sample of each fixture (all its splits): what `test` scores with test_dir pointing at it.
ALL_ANNOTATED = {"fundus": 11, "mask_folder": 8, "oct_layers": 11, "oct_semseg": 6, "retouch": 6 * 4}


def test_test_dir_scores_every_annotated_sample_of_a_held_out_dataset(datamodule, request):
    name = request.node.callspec.params["datamodule"]
    dm = type(datamodule)(**{**datamodule.hparams, "test_dir": datamodule.root})
    dm.setup("test")
    assert len(dm.test_set) == ALL_ANNOTATED[name]
    assert all({"mask", "coords"} & set(dm.test_set[i]) for i in range(len(dm.test_set)))  # scorable


def test_predict_says_how_many_samples_of_which_dataset_it_predicts(datamodule, caplog):
    caplog.set_level(logging.INFO)
    datamodule.setup("predict")
    datamodule.predict_dataloader()
    n = len(datamodule.predict_set)
    assert n and f"predicting {n} samples of {datamodule.root} (predict_dir not set)" in caplog.text
