"""ISIC 2018 Task 1 lesion recipe: mask-folder data, SMPNet DeepLabV3+, backbone freezing, thresholded
Jaccard, and the recipe through the CLI."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from octlightning.callbacks import FreezeBackbone
from octlightning.cli import run_cli
from octlightning.data.mask_folder import ISIC_TRAIN, ISIC_VAL, MaskFolderDataModule
from octlightning.errors import ConfigError, DataError
from octlightning.metrics import confusion_counts, scores_from_counts, thresholded_jaccard
from octlightning.models.smp_net import SMPNet
from octlightning.tasks.segmentation import SegmentationTask
from tests.conftest import CPU_TRAINER, REPO, shared
from tests.fixtures.isic import MASK_KINDS, TEST_SIZES, TRAIN_SIZES, lesion_image, write_isic_layout


@pytest.fixture(scope="module")
def isic_root(tmp_path_factory) -> Path:
    return write_isic_layout(tmp_path_factory.mktemp("isic"))


def _dm(root: Path, **kw) -> MaskFolderDataModule:
    kw.setdefault("image_size", 32)
    return MaskFolderDataModule(str(root), batch_size=2, num_workers=0, **kw)


# ----------------------------------------------------------------------------- data
def test_isic_layout_resizes_every_mask_kind_to_binary_and_keeps_the_original_size(isic_root):
    dm = _dm(isic_root, image_size=(32, 40), val_fraction=0.34, augment=False)
    dm.setup("fit")
    samples = [dm.train_set[i] for i in range(len(dm.train_set))] + [dm.val_set[i] for i in range(len(dm.val_set))]
    assert sorted(s["id"] for s in samples) == [f"ISIC_{i:07d}" for i in range(1, 7)]  # LICENSE.txt ignored
    assert len(dm.val_set) == 2
    for s in samples:
        n = int(s["id"][-1]) - 1
        assert s["image"].shape == (3, 32, 40) and s["mask"].shape == (1, 32, 40)
        assert s["file_size"].tolist() == list(TRAIN_SIZES[n])
        # 1-bit, 0/1, 0/255 and palette masks all give the lesion as {0, 1}, about its true area
        assert set(s["mask"].unique().tolist()) == {0.0, 1.0}, MASK_KINDS[n % 4]
        lesion = s["mask"][0].bool()
        assert s["image"][0][lesion].mean() < s["image"][0][~lesion].mean()  # the mask sits on the dark lesion
    # ImageNet normalisation: the bright skin is above the ImageNet mean in the red channel
    assert samples[0]["image"][0].max() > 0.5
    batch = next(iter(dm.val_dataloader()))
    assert batch["file_size"].shape == (2, 2) and batch["image"].shape == (2, 3, 32, 40)


def test_split_is_seeded_and_folders_win_over_fractions(isic_root, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ids = {}
    for seed in (1, 1, 2):
        dm = _dm(isic_root, seed=seed, val_fraction=0.34, test_fraction=0.34)
        split = dm.splits()
        ids.setdefault(seed, []).append([p.id for p in split["val"]])
        # the test folder exists: test_fraction holds nothing out of the training images
        assert split["test"] == [] and len(split["train"]) == 4
    assert ids[1][0] == ids[1][1]
    # said: the recipe's test_fraction was read as holding out images (a new user's trial)
    assert f"the dataset's own split folders: test from {isic_root / 'ISIC2018_Task1-2_Test_Input'}" in caplog.text
    dm.setup("test")
    assert [p.id for p in dm.test_set.pairs] == ["ISIC_0000200", "ISIC_0000201"]

    # no test folder: test_fraction holds out images, disjoint from train and val
    root = write_isic_layout(tmp_path / "noval", with_val=True, with_test=False)
    dm = _dm(root, val_fraction=0.5, test_fraction=0.34)
    split = dm.splits()
    assert [p.id for p in split["val"]] == ["ISIC_0000100", "ISIC_0000101"]  # validation folder used
    train, test = {p.id for p in split["train"]}, {p.id for p in split["test"]}
    assert len(test) == 2 and len(train) == 4 and not train & test
    dm.setup("test")
    assert {p.id for p in dm.test_set.pairs} == test


def test_the_split_line_counts_only_what_it_drew_from_the_training_images(tmp_path, caplog):
    # with a Validation folder it said "30 training images split: train 24, val 10, test 6" (a new user's trial)
    root = write_isic_layout(tmp_path / "valfolder", with_val=True, with_test=False)
    with caplog.at_level(logging.INFO):
        split = _dm(root, test_fraction=0.25).splits()
    line = next(r.getMessage() for r in caplog.records if "training images split" in r.getMessage())
    train, test = len(split["train"]), len(split["test"])
    assert line.endswith(f"{train + test} training images split (seed 42): train {train}, test {test} images"), line
    assert split["val"] and test


def test_cross_validation_folds_hold_out_every_training_image_once(isic_root, tmp_path):
    root = write_isic_layout(tmp_path / "notest", with_val=False, with_test=False)
    tested: list[str] = []
    for fold in range(3):
        split = _dm(root, val_fraction=0.25, num_folds=3, fold=fold).splits()
        ids = {k: {p.id for p in v} for k, v in split.items()}
        assert not (ids["train"] & ids["val"] or (ids["train"] | ids["val"]) & ids["test"])
        tested += ids["test"]
    everything = sorted(p.id for part in _dm(root, val_fraction=0.25).splits().values() for p in part)
    assert sorted(tested) == everything
    # the layout's own test folder is the test split: folds would have nothing to draw
    with pytest.raises(DataError, match=r"ISIC2018_Task1-2_Test_Input: the dataset's own test folder.*num_folds 3"):
        _dm(isic_root, num_folds=3).splits()


def test_augmentation_changes_training_samples_but_not_masks_values(isic_root):
    dm = _dm(isic_root)
    dm.setup("fit")
    torch.manual_seed(0)
    a = [dm.train_set[0] for _ in range(6)]
    assert any(not torch.equal(a[0]["image"], s["image"]) for s in a[1:])
    assert all(set(s["mask"].unique().tolist()) <= {0.0, 1.0} for s in a)
    # validation images are never augmented
    assert torch.equal(dm.val_set[0]["image"], dm.val_set[0]["image"])


def test_other_naming_by_glob_and_pattern_kvasir_style(tmp_path):
    rng = np.random.default_rng(3)
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i, (h, w) in enumerate([(30, 40), (36, 30), (33, 33)]):
        image, lesion = lesion_image(rng, h, w)
        Image.fromarray(image).save(tmp_path / "images" / f"case{i}.jpg")
        Image.fromarray(lesion.astype(np.uint8) * 255).save(tmp_path / "masks" / f"case{i}.jpg", quality=75)
    kw = dict(image_dir="images", mask_dir="masks", mask_pattern="{stem}.jpg", val_fraction=0.34)
    # JPEG masks are not two-valued: refused as they are, accepted with a threshold
    with pytest.raises(DataError, match=r"case\d\.jpg.*not binary"):
        dm = _dm(tmp_path, **kw)
        dm.setup("fit")
        [dm.train_set[i] for i in range(len(dm.train_set))]
    dm = _dm(tmp_path, mask_threshold=127, **kw)
    dm.setup("fit")
    assert set(dm.val_set[0]["mask"].unique().tolist()) == {0.0, 1.0}


def test_ph2_as_distributed_nested_folders_with_one_pattern(tmp_path):
    """PH2's own layout: IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp + IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp."""
    rng = np.random.default_rng(4)
    base = tmp_path / "PH2 Dataset images"
    for case in ("IMD002", "IMD003", "IMD004"):
        image, lesion = lesion_image(rng, 30, 40)
        for sub in ("Dermoscopic_Image", "lesion", "roi"):
            (base / case / f"{case}_{sub}").mkdir(parents=True)
        Image.fromarray(image).save(base / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp")
        Image.fromarray(lesion).convert("1").save(base / case / f"{case}_lesion" / f"{case}_lesion.bmp")
        Image.fromarray(lesion).convert("1").save(base / case / f"{case}_roi" / f"{case}_R1_Label4.bmp")
    dm = _dm(
        tmp_path,
        image_dir="PH2 Dataset images",
        mask_dir="PH2 Dataset images",
        image_glob="*/*_Dermoscopic_Image/*.bmp",
        mask_pattern="{stem}/{stem}_lesion/{stem}_lesion.bmp",
        val_fraction=0.34,
    )
    split = dm.splits()
    pairs = sorted(split["train"] + split["val"], key=lambda p: p.id)
    assert [(p.id, p.mask.name) for p in pairs] == [(c, f"{c}_lesion.bmp") for c in ("IMD002", "IMD003", "IMD004")]


def test_predict_dir_takes_any_image_type(isic_root, tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "photo.png")
    dm = _dm(isic_root, predict_dir=str(tmp_path))
    dm.setup("predict")
    sample = dm.predict_set[0]
    assert sample["id"] == "photo" and sample["file_size"].tolist() == [20, 30] and "mask" not in sample


# ----------------------------------------------------------------------------- bad input
def _copy(tmp_path: Path) -> Path:
    return write_isic_layout(tmp_path / "isic")


def test_image_without_mask_and_mask_without_image_name_the_files(tmp_path):
    root = _copy(tmp_path)
    (root / ISIC_TRAIN[1] / "ISIC_0000003_segmentation.png").unlink()
    (root / ISIC_TRAIN[0] / "ISIC_0000005.jpg").unlink()
    with pytest.raises(DataError) as err:
        _dm(root).setup("fit")
    assert "images without a mask" in str(err.value) and "ISIC_0000003.jpg" in str(err.value)
    assert "without an image" in str(err.value) and "ISIC_0000005_segmentation.png" in str(err.value)


def test_mask_with_more_than_two_values_is_an_error_naming_it(tmp_path):
    root = _copy(tmp_path)
    path = root / ISIC_TRAIN[1] / "ISIC_0000002_segmentation.png"
    h, w = TRAIN_SIZES[1]
    Image.fromarray((np.arange(h * w).reshape(h, w) % 3 * 100).astype(np.uint8)).save(path)
    dm = _dm(root, val_fraction=0.5)
    dm.setup("fit")
    with pytest.raises(DataError, match="ISIC_0000002_segmentation.png.*not binary"):
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            list(loader)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_images_are_errors_naming_the_file(tmp_path, content):
    root = _copy(tmp_path)
    path = root / ISIC_TRAIN[0] / "ISIC_0000004.jpg"
    if content == "truncated":  # header intact, pixels cut off: found when decoded
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    dm = _dm(root, val_fraction=0.5)
    with pytest.raises(DataError, match="ISIC_0000004.jpg"):
        dm.setup("fit")
        [s for ds in (dm.train_set, dm.val_set) for s in ds]


def test_mask_of_another_size_and_val_images_without_masks_are_errors(tmp_path):
    root = _copy(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / ISIC_TRAIN[1] / "ISIC_0000001_segmentation.png")
    with pytest.raises(DataError, match="ISIC_0000001_segmentation.png.*ISIC_0000001.jpg"):
        _dm(root).setup("fit")
    root = write_isic_layout(tmp_path / "val", with_val=True)
    for p in (root / ISIC_VAL[1]).iterdir():
        p.unlink()
    (root / ISIC_VAL[1]).rmdir()
    with pytest.raises(DataError, match="Validation_Input.*ground-truth"):
        _dm(root).setup("fit")
    _dm(root, val_image_dir=None).setup("fit")  # the documented way out: split the training set


# ----------------------------------------------------------------------------- metric
def test_thresholded_jaccard_matches_hand_computed_values():
    assert thresholded_jaccard([0.9, 0.65, 0.6499, 0.3, 0.0, 1.0]).tolist() == [0.9, 0.65, 0.0, 0.0, 0.0, 1.0]
    # from masks: 8 of 10 lesion pixels found + 2 false positives -> IoU 8/12; 6 found + 8 false -> 6/18
    target = torch.zeros(10, 10, dtype=torch.long)
    target[0, :10] = 1
    good, bad = torch.zeros_like(target), torch.zeros_like(target)
    good[0, :8], good[1, :2] = 1, 1
    bad[0, :6], bad[2, :8] = 1, 1
    valid = torch.ones_like(target, dtype=torch.bool)
    ious = [float(scores_from_counts(confusion_counts(p, target, valid, 2))["iou"][1]) for p in (good, bad)]
    assert ious == pytest.approx([8 / 12, 6 / 18])
    scores = thresholded_jaccard(ious)
    assert scores.tolist() == pytest.approx([8 / 12, 0.0])
    assert float(scores.mean()) == pytest.approx(4 / 12)  # the challenge score of these two images
    assert thresholded_jaccard(0.7, threshold=0.8).item() == 0.0


# ----------------------------------------------------------------------------- model
def test_smpnet_loads_encoder_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    source = SMPNet("DeepLabV3Plus", "resnet18").encoder.state_dict()
    bare = tmp_path / "resnet18.pth"
    torch.save({**source, "fc.weight": torch.zeros(10, 512)}, bare)  # torchvision style: fc ignored
    torch.manual_seed(1)
    net = SMPNet("DeepLabV3Plus", "resnet18", encoder_weights=str(bare))
    assert torch.equal(net.encoder.conv1.weight, source["conv1.weight"])
    assert torch.equal(net.encoder.layer4[1].bn2.running_var, source["layer4.1.bn2.running_var"])
    # a whole-model checkpoint (prefixed keys) in safetensors works too; other in_channels are adapted
    from safetensors.torch import save_file

    wrapped = tmp_path / "model.safetensors"
    save_file({f"model.encoder.{k}": v.contiguous() for k, v in source.items()}, str(wrapped))
    net = SMPNet("Unet", "resnet18", encoder_weights=str(wrapped), in_channels=1)
    assert torch.equal(net.encoder.layer1[0].conv1.weight, source["layer1.0.conv1.weight"])
    assert net.encoder.conv1.weight.shape[1] == 1 and net.stride == 32

    unrelated = tmp_path / "other.pt"
    torch.save({"decoder.weight": torch.zeros(3), "head.bias": torch.zeros(1)}, unrelated)
    with pytest.raises(ValueError, match="other.pt.*no key matches"):
        SMPNet("DeepLabV3Plus", "resnet18", encoder_weights=str(unrelated))
    partial = tmp_path / "partial.pth"  # e.g. the weights of a shallower encoder
    torch.save({k: v for k, v in source.items() if not k.startswith("layer4")}, partial)
    # the message says what to do: a file of this encoder, or the encoder_name of the file's
    with pytest.raises(ConfigError, match=r"partial.pth.*not in the file.*of this one \(resnet18\), or set "):
        SMPNet("DeepLabV3Plus", "resnet18", encoder_weights=str(partial))
    with pytest.raises(ConfigError, match=r"missing.pth .*set --model.init_args.net.init_args.encoder_weights"):
        SMPNet("DeepLabV3Plus", "resnet18", encoder_weights=str(tmp_path / "missing.pth"))


def test_deeplabv3plus_gets_the_published_atrous_rates_from_arch_kwargs():
    net = SMPNet("DeepLabV3Plus", "resnet18", arch_kwargs={"decoder_atrous_rates": [6, 12, 18]})
    dilations = [m.dilation[0] for m in net.model.decoder.aspp[0].modules() if isinstance(m, nn.Conv2d)]
    assert {6, 12, 18} <= set(dilations) and 24 not in dilations
    assert net.stride == 16
    assert net(torch.zeros(2, 3, 32, 48)).shape == (2, 1, 32, 48)


# ----------------------------------------------------------------------------- backbone freezing
class _TinyNet(nn.Module):
    """An encoder (with BatchNorm, like a ResNet) and a head: what FreezeBackbone acts on."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


class _Probe(L.Callback):
    """Records, at every epoch's start and end, what the encoder's parameters look like."""

    def __init__(self) -> None:
        self.starts: list[dict] = []
        self.conv_at_end: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.starts.append(
            {
                "conv_grad": pl_module.net.encoder[0].weight.requires_grad,
                "bn_grad": pl_module.net.encoder[1].weight.requires_grad,
                "groups": len(opt.param_groups),
                "lrs": [g["lr"] for g in opt.param_groups],
            }
        )

    def on_train_epoch_end(self, trainer, pl_module):
        self.conv_at_end.append(pl_module.net.encoder[0].weight.detach().clone())


@pytest.mark.parametrize(
    ("freeze_by", "scheduler"), [("requires_grad", "none"), ("requires_grad", "cosine"), ("gradients", "cosine")]
)
def test_freeze_backbone_freezes_then_unfreezes_with_a_lower_lr(freeze_by, scheduler, caplog):
    L.seed_everything(0)
    data = [
        {"image": torch.randn(3, 8, 8), "mask": (torch.rand(1, 8, 8) > 0.5).float(), "id": str(i)} for i in range(4)
    ]
    task = SegmentationTask(_TinyNet(), lr=1e-2, scheduler=scheduler, auroc=False)
    initial = task.net.encoder[0].weight.detach().clone()
    probe = _Probe()
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        callbacks=[FreezeBackbone(unfreeze_at_epoch=2, lr_factor=0.1, freeze_by=freeze_by), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(task, DataLoader(data, batch_size=2))
    # a loaded encoder's freeze said nothing (a new user's trial)
    assert "FreezeBackbone: net.encoder frozen for epochs 0-1, then trained at 0.1 x the learning rate" in caplog.text
    if freeze_by == "requires_grad":
        assert "FreezeBackbone: epoch 2: net.encoder unfrozen" in caplog.text
        assert [s["conv_grad"] for s in probe.starts] == [False, False, True, True]
        assert [s["groups"] for s in probe.starts] == [1, 1, 2, 2]
    else:  # the DDP-safe way: parameters keep requires_grad, their own group exists from the start
        assert [s["conv_grad"] for s in probe.starts] == [True] * 4
        assert [s["groups"] for s in probe.starts] == [2, 2, 2, 2]
    assert all(s["bn_grad"] for s in probe.starts)  # BatchNorm keeps training (Lightning's default)
    head_lr, encoder_lr = probe.starts[2]["lrs"]
    assert encoder_lr == pytest.approx(0.1 * head_lr)
    if scheduler == "cosine":  # the encoder's group follows the schedule too
        assert probe.starts[3]["lrs"][1] == pytest.approx(0.1 * probe.starts[3]["lrs"][0])
        assert probe.starts[3]["lrs"][1] < encoder_lr
    # frozen epochs leave the encoder's convolution untouched, fine-tuning changes it
    assert torch.equal(probe.conv_at_end[0], initial) and torch.equal(probe.conv_at_end[1], initial)
    assert not torch.equal(probe.conv_at_end[3], initial)


def test_freeze_backbone_names_a_missing_module():
    task = SegmentationTask(nn.Conv2d(3, 1, 1), auroc=False)
    with pytest.raises(AttributeError, match="net.encoder"):
        FreezeBackbone().freeze_before_training(task)


# ----------------------------------------------------------------------------- the recipe through the CLI
CONFIG = str(REPO / "hparams" / "isic_deeplabv3plus.json")
TINY_ISIC = [
    "--model.init_args.net.init_args.encoder_name",
    "resnet18",
    "--data.init_args.image_size",
    "[64, 64]",
    "--data.init_args.batch_size",
    "2",
    "--data.init_args.num_workers",
    "0",
    *CPU_TRAINER,
    "--comet",
    "false",
]


def _cli(subcommand: str, root: Path, runs: Path, *extra: str):
    return run_cli(
        [
            subcommand,
            "--config",
            CONFIG,
            "--data.init_args.root",
            str(root),
            "--trainer.default_root_dir",
            str(runs),
            *TINY_ISIC,
            *extra,
        ]
    )


def test_recipe_fit_test_predict_through_the_cli(isic_root, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cli = _cli("fit", isic_root, tmp_path, "--trainer.fast_dev_run", "true")
    assert isinstance(cli.model.net, SMPNet) and cli.model.net.model.__class__.__name__ == "DeepLabV3Plus"
    assert any(isinstance(c, FreezeBackbone) for c in cli.trainer.callbacks)  # from the JSON callbacks list
    assert cli.model.net.encoder.conv1.weight.requires_grad  # a random encoder is not frozen (issue 18)
    not_frozen = "was not loaded from pretrained weights; it trains from the first epoch"
    assert not_frozen in caplog.text
    caplog.clear()

    cli = _cli("test", isic_root, tmp_path, "--trainer.fast_dev_run", "true")
    (csv_path,) = tmp_path.rglob("test_metrics.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["id"] for r in rows] == ["ISIC_0000200", "ISIC_0000201"]
    for r in rows:
        iou, tj = float(r["iou"]), float(r["thresholded_jaccard"])
        assert tj == (iou if iou >= 0.65 else 0.0)
    logged = float(cli.trainer.callback_metrics["test/thresholded_jaccard"])
    assert logged == pytest.approx(np.mean([float(r["thresholded_jaccard"]) for r in rows]))

    _cli("predict", isic_root, tmp_path, "--trainer.fast_dev_run", "true")
    (out,) = {p.parent for p in tmp_path.rglob("*_mask.png")}
    for sid, (h, w) in zip(["ISIC_0000200", "ISIC_0000201"], TEST_SIZES, strict=True):
        for kind in ("mask", "prob", "overlay"):
            assert Image.open(out / f"{sid}_{kind}.png").size == (w, h), (sid, kind)
        assert set(np.unique(np.asarray(Image.open(out / f"{sid}_mask.png")))) <= {0, 255}
    assert not_frozen not in caplog.text  # nothing trains in test or predict: it was said there too


# ----------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_shared_ph2_set_loads_with_binary_masks():
    root = shared("ph2_isic")
    dm = MaskFolderDataModule(str(root), batch_size=4, num_workers=0, image_size=64, test_fraction=0.2)
    split = dm.splits()
    pairs = split["train"] + split["val"] + split["test"]
    assert len(pairs) == 40 and len({p.id for p in pairs}) == 40
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (24, 8, 8)
    for p in pairs:
        assert 553 <= p.size[0] <= 577 and 761 <= p.size[1] <= 769
    from octlightning.data.io import read_binary_mask

    by_id = {p.id: p for p in pairs}
    fractions = {sid: float(read_binary_mask(by_id[sid].mask).mean()) for sid in ("PH2_IMD002", "PH2_IMD064")}
    assert fractions == pytest.approx({"PH2_IMD002": 0.275, "PH2_IMD064": 0.792}, abs=0.001)  # DATA.md table
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
