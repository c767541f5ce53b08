"""Foundation-model tuning for OCT segmentation: MIRAGE layout, HDF5 converter, ViT loading, HD95, CLI."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import warnings
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from octlightning.checkpoints import UnsafeCheckpointError
from octlightning.cli import run_cli
from octlightning.conversion import main as convert_main
from octlightning.conversion.h5_to_mirage import IGNORE_VALUE, convert_h5, layer_class_map
from octlightning.data.formats.mirage import read_info, read_value_mask, write_info
from octlightning.data.oct_semseg import OCTSemSegDataModule
from octlightning.errors import DataError
from octlightning.evaluate import evaluate
from octlightning.evaluate import main as evaluate_main
from octlightning.metrics import hausdorff_percentile, hd95_per_class
from octlightning.models.foundation import FoundationSegNet
from octlightning.tasks.segmentation import SegmentationTask
from tests.conftest import REPO, shared
from tests.fixtures.oct_layers import DUKE_H as H
from tests.fixtures.oct_layers import DUKE_W as W
from tests.fixtures.oct_layers import write_oct_h5

CONFIG = str(REPO / "hparams" / "duke_dme_foundation.json")


@pytest.fixture(scope="module")
def semseg_root(tmp_path_factory) -> Path:
    """The tiny HDF5 file converted to the MIRAGE layout (5 subjects: 3 train, 1 val, 1 test)."""
    tmp = tmp_path_factory.mktemp("semseg")
    h5 = write_oct_h5(tmp / "oct.h5")
    return convert_h5(h5, tmp / "dataset", val_fraction=0.2, test_fraction=0.2, seed=0)


def tiny_vit_state(grid: int = 4, seed: int = 0) -> tuple[VisionTransformer, dict[str, torch.Tensor]]:
    """A tiny timm ViT and its weights renamed as a MIRAGE (MultiMAE) checkpoint stores them."""
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=8 * grid, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2,
        num_classes=0, global_pool="", no_embed_class=True, final_norm=False,
    )  # fmt: skip
    with torch.no_grad():
        vit.pos_embed.normal_()
        vit.cls_token.normal_()
    sd = {}
    for k, v in vit.state_dict().items():
        if k == "pos_embed":  # MultiMAE keeps a (1, D, h, w) grid
            sd["input_adapters.bscan.pos_emb"] = v.transpose(1, 2).reshape(1, 32, grid, grid).clone()
        elif k == "cls_token":
            sd["global_tokens"] = v.clone()
        elif k.startswith("patch_embed.proj."):
            sd["input_adapters.bscan.proj." + k.removeprefix("patch_embed.proj.")] = v.clone()
        else:
            sd[k.replace("blocks.", "encoder.", 1)] = v.clone()
    return vit, sd


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "mirage_tiny.pth"
    torch.save({"model": tiny_vit_state()[1]}, path)
    return path


# --------------------------------------------------------------------------- model
def test_tiny_preset_gives_logits_at_the_input_size_with_both_decoders(tiny_ckpt):
    x = torch.rand(2, 1, 24, 40)
    for decoder in ("convnext", "linear"):
        net = FoundationSegNet("tiny", num_classes=3, weights=str(tiny_ckpt), decoder=decoder, decoder_channels=8)
        assert net(x).shape == (2, 3, 24, 40)
    net = FoundationSegNet("tiny", num_classes=3, mode="finetune", dynamic_img_size=True, decoder_channels=8)
    assert net.stride == 8
    assert net(torch.rand(1, 1, 48, 64)).shape == (1, 3, 48, 64)


def test_mirage_named_checkpoint_loads_into_the_timm_encoder(tmp_path, caplog):
    source, sd = tiny_vit_state(grid=4)
    sd = {f"module.{k}": v for k, v in sd.items()}  # a DDP-wrapped save
    sd["module.output_adapters.bscan.head.weight"] = torch.zeros(3)  # pretraining decoder: not ours
    path = tmp_path / "mirage.pth"
    torch.save({"model": sd}, path)
    # every encoder tensor loaded: said, not warned (the warning was attributed to a jsonargparse file)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = FoundationSegNet("tiny", num_classes=2, weights=str(path), decoder_channels=8)
    assert "0 encoder tensors keep their initial values []; 1 checkpoint tensors skipped" in caplog.text
    assert not [w for w in caught if "tensors skipped" in str(w.message)]
    assert net.load_report.unexpected == ["module.output_adapters.bscan.head.weight"]
    assert net.load_report.missing == []
    x = torch.rand(2, 1, 32, 32)
    # Same tokens as the source ViT: blocks, patch embedding, (1, D, h, w) grid order and global token.
    torch.testing.assert_close(net.encoder.forward_features(x), source.forward_features(x))
    # an encoder tensor the file lacks stays random: that is warned
    block = "module.encoder.0.attn.qkv.weight"
    torch.save({"model": {k: v for k, v in sd.items() if k != block}}, path)
    with pytest.warns(UserWarning, match="1 encoder tensors keep their initial values"):
        FoundationSegNet("tiny", num_classes=2, weights=str(path), decoder_channels=8)


def test_position_embedding_is_interpolated_for_another_input_size(tmp_path):
    _, sd = tiny_vit_state(grid=2)  # pretrained at 16 x 16, the tiny preset works at 32 x 32
    path = tmp_path / "small_grid.pth"
    torch.save(sd, path)
    net = FoundationSegNet("tiny", num_classes=2, weights=str(path), decoder_channels=8)
    assert net.encoder.pos_embed.shape == (1, 16, 32)
    assert any("position embedding" in a for a in net.load_report.adapted)
    # RGB weights (RETFound) into a gray encoder: the patch embedding is adapted, not refused
    rgb = {k: v.repeat(1, 3, 1, 1) / 3 if k == "input_adapters.bscan.proj.weight" else v for k, v in sd.items()}
    torch.save(rgb, path)
    net = FoundationSegNet("tiny", num_classes=2, weights=str(path), decoder_channels=8)
    torch.testing.assert_close(
        net.encoder.patch_embed.proj.weight, sd["input_adapters.bscan.proj.weight"], rtol=1e-5, atol=1e-6
    )


def test_a_checkpoint_that_matches_nothing_or_misfits_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(ValueError, match="no key of the checkpoint matches the encoder"):
        FoundationSegNet("tiny", num_classes=2, weights=str(path))
    _, sd = tiny_vit_state()
    torch.save(sd, path)
    with pytest.raises(ValueError, match="do not fit the encoder"):  # ViT-tiny weights, wider encoder
        FoundationSegNet("tiny", num_classes=2, weights=str(path), embed_dim=64)
    with pytest.warns(UserWarning, match="encoder stays random"):
        FoundationSegNet("tiny", num_classes=2, mode="frozen")


def test_a_checkpoint_pickling_other_objects_is_refused(tmp_path):
    # The released MIRAGE .pth files pickle their argparse.Namespace next to the weights.
    path = tmp_path / "mirage_release.pth"
    torch.save({"model": tiny_vit_state()[1], "args": argparse.Namespace(model="mirage_base")}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        FoundationSegNet("tiny", num_classes=2, weights=str(path))


def test_frozen_mode_trains_the_decoder_only(tiny_ckpt):
    net = FoundationSegNet("tiny", num_classes=3, weights=str(tiny_ckpt), decoder_channels=8, decoder_depth=1)
    task = SegmentationTask(net, num_classes=3, loss="ce_gdice", optimizer="adamw", lr=1e-2, channels_last=False)
    task.train()
    assert not net.encoder.training and net.decoder.training  # no dropout/drop-path in a frozen encoder
    opt = task.configure_optimizers()
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in net.decoder.parameters()}
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    x, y = torch.rand(2, 1, 24, 40), torch.randint(0, 3, (2, 1, 24, 40))
    task.loss_fn(task(x), y).backward()
    opt.step()
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    assert any(not torch.equal(v, decoder_before[k]) for k, v in net.decoder.state_dict().items())


def test_finetune_layer_decay_gives_lower_rates_to_earlier_layers(tiny_ckpt):
    net = FoundationSegNet("tiny", num_classes=3, weights=str(tiny_ckpt), mode="finetune", layer_decay=0.5)
    task = SegmentationTask(net, num_classes=3, lr=1e-3, optimizer="adamw", weight_decay=0.05)
    opt = task.configure_optimizers()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in net.parameters())  # every parameter exactly once
    enc = net.encoder
    assert lr_of[id(enc.patch_embed.proj.weight)] == pytest.approx(1e-3 * 0.5**3)
    assert lr_of[id(enc.blocks[0].attn.qkv.weight)] == pytest.approx(1e-3 * 0.5**2)
    assert lr_of[id(enc.blocks[1].attn.qkv.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(net.decoder.head.weight)] == pytest.approx(1e-3)
    assert wd_of[id(enc.blocks[1].attn.qkv.weight)] == 0.05 and wd_of[id(enc.pos_embed)] == 0.0


# --------------------------------------------------------------------------- HD95
def test_hd95_on_hand_made_masks():
    ref = np.zeros((50, 100), bool)
    ref[10, :] = True  # a one-pixel line is its own boundary
    pred = np.zeros_like(ref)
    pred[12, :] = True
    pred[40, 50] = True  # one stray pixel 30 px from the reference
    # 100 of 101 prediction boundary pixels lie 2 px away: the 95th percentile ignores the stray one.
    assert hausdorff_percentile(pred, ref, 95) == pytest.approx(2.0)
    assert hausdorff_percentile(pred, ref, 100) == pytest.approx(30.0)
    # A 10 x 10 square shifted by 3 rows and 4 columns: every boundary distance is at most 5.
    a = np.zeros((40, 40), bool)
    a[5:15, 5:15] = True
    b = np.roll(a, (3, 4), axis=(0, 1))
    assert hausdorff_percentile(a, b, 100) == pytest.approx(5.0)
    assert hausdorff_percentile(a, b, 95, spacing=(2.0, 1.0)) <= hausdorff_percentile(a, b, 100, spacing=(2.0, 1.0))
    # per class: absent from both -> NaN (skipped by means); absent from one -> the image diagonal;
    # outside `valid` ignored
    labels_ref = np.zeros((30, 40), np.int64)
    labels_ref[5:10, :] = 1
    labels_pred = labels_ref.copy()
    labels_pred[20:22, 0:5] = 2
    valid = np.ones_like(ref[:30, :40])
    hd = hd95_per_class(labels_pred, labels_ref, 4, valid)
    assert hd[0] == 0.0 and hd[1] == pytest.approx(50.0) and np.isnan(hd[2])
    valid[20:22, 0:5] = False
    hd = hd95_per_class(labels_pred, labels_ref, 4, valid)
    assert hd[0] == 0.0 and np.isnan(hd[1:]).all()


def test_hausdorff_matches_torchmetrics_at_the_100th_percentile():
    from torchmetrics.functional.segmentation import hausdorff_distance

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((24, 24)) < 0.1, np.zeros((24, 24), bool)
        b[4:15, 6:20] = True
        # square images: torchmetrics 1.9's own distance transform mis-indexes non-square ones
        expected = hausdorff_distance(
            torch.from_numpy(a.astype(np.int64))[None],
            torch.from_numpy(b.astype(np.int64))[None],
            2,
            input_format="index",
        )
        assert hausdorff_percentile(a, b, 100) == pytest.approx(float(expected), abs=1e-5)


# --------------------------------------------------------------------------- layout and INFO.json
def test_info_json_maps_values_to_classes_and_back(tmp_path):
    # the GOALS example from the MIRAGE benchmark, plus an unannotated marker
    path = write_info(tmp_path / "INFO.json", ["Elsewhere", "RNFL", "GCIPL", "Choroid"], [0, 80, 160, 250], 255)
    info = read_info(path)
    assert info.values == (0, 80, 160, 250) and info.ignore_values == (255,)
    assert info.foreground_names == ["RNFL", "GCIPL", "Choroid"]
    mask = np.array([[0, 80, 160], [250, 255, 80]], dtype=np.uint8)
    labels, valid = info.to_labels(mask, tmp_path / "m.png")
    assert labels.tolist() == [[0, 1, 2], [3, 0, 1]]
    assert valid.tolist() == [[True, True, True], [True, False, True]]
    assert np.array_equal(info.to_values(labels, valid), mask)
    with pytest.raises(DataError, match=r"m\.png: mask values \[7\]"):
        info.to_labels(np.array([[0, 7]], dtype=np.uint8), tmp_path / "m.png")
    # Duke iAMD style: the Invalid entry comes first; the classes still number from 0
    path.write_text(json.dumps({"0": {"value": 0, "label": "Invalid"}, "1": {"value": 51, "label": "Above ILM"},
                                "2": {"value": 102, "label": "ILM-Inner RPEDC"}}))  # fmt: skip
    info = read_info(path)
    assert info.names == ("Above ILM", "ILM-Inner RPEDC") and info.ignore_values == (0,)
    path.write_text(json.dumps({"0": {"value": 0, "label": "a"}, "1": {"value": 0, "label": "b"}}))
    with pytest.raises(DataError, match="used by more than one entry"):
        read_info(path)


def test_layer_class_map_marks_unknown_rows_and_keeps_certain_ones():
    b = np.array([[3, 5, 8], [3, np.nan, 8], [np.nan] * 3, [3, 5, 5]], dtype=np.float32)
    labels, valid = layer_class_map(b, 12)
    assert labels[:, 0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    # boundary 1 unknown: rows 3..7 could be class 1 or 2; the rows outside are certain
    assert valid[:, 1].tolist() == [True] * 3 + [False] * 5 + [True] * 4
    assert labels[valid[:, 1], 1].tolist() == [0, 0, 0, 3, 3, 3, 3]
    assert not valid[:, 2].any()  # no boundary annotated in this column
    assert 2 not in labels[:, 3]  # zero-thickness layer


def test_converter_writes_the_layout_split_by_subject(semseg_root):
    info = read_info(semseg_root / "INFO.json")
    assert info.num_classes == 10 and info.names[-1] == "Fluid" and info.ignore_values == (IGNORE_VALUE,)
    split = json.loads((semseg_root / "split.json").read_text())["subjects"]
    assert sorted(sum(split.values(), [])) == [1, 2, 3, 4, 5] and len(split["test"]) == 1
    for name, subjects in split.items():
        stems = sorted(p.stem for p in (semseg_root / name / "bscan").glob("*.png"))
        assert stems == sorted(p.stem for p in (semseg_root / name / "semseg").glob("*.png"))
        assert {int(s[7:9]) for s in stems} == set(subjects)
    subject = split["test"][0]
    mask = read_value_mask(semseg_root / "test" / "semseg" / f"subject{subject:02d}_010.png")
    labels, valid = info.to_labels(mask, Path("m"))
    with h5py.File(semseg_root.parent / "oct.h5") as f:
        i = int(np.flatnonzero((f["subject"][:] == subject) & (f["bscan_index"][:] == 10))[0])
        bounds, fluid = f["layer_maps"][i], f["fluid_masks"][i] > 0
    assert not valid[:, :3].any()  # unannotated columns
    assert (labels[fluid] == 9).all() and valid[fluid].all()  # fluid on top, always annotated
    # column 20 lacks boundary 4: rows between boundaries 3 and 5 are unknown unless fluid
    rows = np.arange(H)
    unknown = (rows >= bounds[20, 3]) & (rows < bounds[20, 5]) & ~fluid[:, 20]
    assert unknown.any() and np.array_equal(~valid[:, 20], unknown)
    assert (labels[rows >= bounds[20, 5], 20] >= 6).all()
    assert labels[0, 10] == 0 and labels[-1, 10] == 8


@pytest.mark.realdata
def test_converter_on_the_shared_duke_file(tmp_path):
    h5 = shared("duke_dme/duke_dme_trainval.h5")
    out = convert_h5(h5, tmp_path / "duke", subjects=[1, 2], val_fraction=0.5, test_fraction=0.0)
    info = read_info(out / "INFO.json")
    assert info.foreground_names == ["NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE", "Below BM", "Fluid"]
    with h5py.File(h5) as f:
        subjects, bscans = f["subject"][:], f["bscan_index"][:]
        crops = json.loads(f.attrs["crop_columns"])
        for i in np.flatnonzero(np.isin(subjects, [1, 2])):
            stem = f"subject{subjects[i]:02d}_{bscans[i]:03d}"
            path = next(out.glob(f"*/semseg/{stem}.png"))
            labels, valid = info.to_labels(read_value_mask(path), path)
            image = np.asarray(Image.open(path.parent.parent / "bscan" / f"{stem}.png"))
            assert np.array_equal(image, f["images"][i])
            lo, hi = crops[str(subjects[i])]
            assert not valid[:, :lo].any() and not valid[:, hi + 1 :].any()
            fluid = f["fluid_masks"][i] > 0
            assert np.array_equal(labels == 9, fluid)  # fluid on top of the layers, nowhere else
            # In a fully annotated column without fluid, class k starts exactly at boundary k-1's row.
            bounds = f["layer_maps"][i]
            clean = np.flatnonzero(~np.isnan(bounds).any(1) & ~fluid.any(0))
            for x in clean[:: max(1, len(clean) // 20)]:
                assert valid[:, x].all()
                column = labels[:, x]
                for k, row in enumerate(bounds[x].astype(int)):
                    assert column[row] >= k + 1 and (row == 0 or column[row - 1] <= k)


def _dm(root: Path, **kw) -> OCTSemSegDataModule:
    return OCTSemSegDataModule(str(root), batch_size=2, num_workers=0, **kw)


def test_datamodule_batches_carry_labels_fov_and_volume(semseg_root):
    dm = _dm(semseg_root)
    assert dm.num_classes == 10 and dm.class_names[0] == "NFL"
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 64)  # 40 columns padded to a multiple of 32
    assert batch["mask"].shape == batch["fov"].shape == (2, 1, 32, 64)
    assert batch["fov"][..., :3].sum() == 0 and batch["fov"][..., 40:].sum() == 0
    assert batch["mask"].max() == 9 and batch["volume"][0].startswith("subject")
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    dm = _dm(semseg_root, in_channels=3, normalize="imagenet", pad_to=1)
    dm.setup("test")
    sample = dm.test_set[0]
    assert sample["image"].shape == (3, 32, 40) and float(sample["image"].min()) < 0


def test_evaluation_only_layout_and_broken_sets_fail_naming_the_file(semseg_root, tmp_path):
    root = tmp_path / "eval_only"
    shutil.copytree(semseg_root / "test", root)
    shutil.copy(semseg_root / "INFO.json", root)
    dm = _dm(root)
    dm.setup("test")
    assert len(dm.test_set) == 2
    with pytest.raises(DataError, match="evaluation-only"):
        dm.setup("fit")
    victim = sorted((root / "semseg").glob("*.png"))[0]
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(victim)
    with pytest.raises(DataError, match=victim.name):
        dm.test_set[0]
    victim.unlink()
    with pytest.raises(DataError, match=victim.stem):
        _dm(root).setup("test")


# --------------------------------------------------------------------------- CLI and evaluation
def _cli_args(subcommand: str, root: Path, runs: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        subcommand, "--config", CONFIG,
        "--data.init_args.root", str(root),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2",
        "--model.init_args.net.init_args.preset", "tiny",
        "--model.init_args.net.init_args.weights", str(ckpt),
        "--model.init_args.net.init_args.decoder_channels", "8",
        "--model.init_args.net.init_args.decoder_depth", "1",
        "--trainer.default_root_dir", str(runs),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.fast_dev_run", "true",
        *extra,
    ]  # fmt: skip


def test_recipe_fits_and_tests_through_the_cli(semseg_root, tiny_ckpt, tmp_path):
    run_cli(_cli_args("fit", semseg_root, tmp_path, tiny_ckpt))
    cli = run_cli(
        _cli_args("test", semseg_root, tmp_path, tiny_ckpt, "--model.init_args.net.init_args.mode", "finetune")
    )
    run_dir = cli.model.run_dir
    rows = list(csv.DictReader(open(run_dir / "test_metrics.csv")))
    assert [r["id"] for r in rows][-1] == "mean" and len(rows) == 3
    for r in rows:
        assert 0 <= float(r["dice_Fluid"]) <= 1 and 0 <= float(r["hd95_px_NFL"]) <= np.hypot(H, W) + 1e-6
    volumes = list(csv.DictReader(open(run_dir / "test_volumes.csv")))
    assert volumes[0]["volume"].startswith("subject") and volumes[0]["slices"] == "2"
    assert float(volumes[0]["hd95_px"]) == pytest.approx(np.nanmean([float(r["hd95_px"]) for r in rows[:2]]))
    # predicted class maps feed straight into the evaluation command and score like the test step
    cli = run_cli(
        _cli_args("predict", semseg_root, tmp_path, tiny_ckpt, "--model.init_args.net.init_args.mode", "finetune")
    )
    scores = tmp_path / "scores.csv"
    evaluate_main([str(cli.model.run_dir / "predictions"), str(semseg_root / "test"), "--out", str(scores)])
    evaluated = list(csv.DictReader(open(scores)))
    assert [r["id"] for r in evaluated] == [r["id"] for r in rows]
    assert float(evaluated[-1]["dice"]) == pytest.approx(float(rows[-1]["dice"]), abs=1e-6)
    assert float(evaluated[-1]["hd95_px"]) == pytest.approx(float(rows[-1]["hd95_px"]), abs=1e-6)


def test_evaluate_command_scores_a_prediction_folder(semseg_root, tmp_path, capsys):
    info = read_info(semseg_root / "INFO.json")
    preds = tmp_path / "preds"
    preds.mkdir()
    refs = sorted((semseg_root / "test" / "semseg").glob("*.png"))
    for ref in refs:  # perfect predictions as `octlightning predict` writes them (class indices)
        labels, _ = info.to_labels(read_value_mask(ref), ref)
        Image.fromarray(labels).save(preds / f"{ref.stem}_mask.png")
    out = tmp_path / "scores.csv"
    evaluate_main([str(preds), str(semseg_root / "test"), "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 3 and rows[-1]["id"] == "mean"
    assert float(rows[-1]["dice"]) == 1.0 and float(rows[-1]["hd95_px"]) == 0.0
    assert (tmp_path / "scores_volumes.csv").is_file()
    assert "2 images: dice 1.0000" in capsys.readouterr().out
    # shift the fluid of one prediction by 2 rows: its Fluid HD95 becomes 2, its Dice drops
    labels = np.asarray(Image.open(preds / f"{refs[0].stem}_mask.png")).copy()
    fluid = labels == 9
    labels[fluid] = 5
    labels[np.roll(fluid, 2, axis=0)] = 9
    Image.fromarray(labels).save(preds / f"{refs[0].stem}_mask.png")
    evaluate_main([str(preds), str(semseg_root / "test"), "--out", str(out), "--no-volumes"])
    first = next(csv.DictReader(open(out)))
    assert float(first["hd95_px_Fluid"]) == pytest.approx(2.0) and float(first["dice_Fluid"]) < 1
    (preds / f"{refs[1].stem}_mask.png").unlink()
    with pytest.raises(SystemExit, match=refs[1].stem):
        evaluate_main([str(preds), str(semseg_root / "test"), "--out", str(out)])


def test_test_step_and_evaluate_write_identical_volume_rows(semseg_root, tmp_path):
    """One per-volume scorer: ``test_volumes.csv`` equals ``evaluate``'s volume rows on the same labels."""
    torch.manual_seed(0)
    dm = _dm(semseg_root, augment=False)
    task = SegmentationTask(
        torch.nn.Conv2d(1, dm.num_classes, 3, padding=1),  # untrained: a mix of right and wrong classes
        num_classes=dm.num_classes, loss="dice_ce", class_names=dm.class_names, hd95=True, channels_last=False,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.test(task, datamodule=dm, verbose=False)
    trainer.predict(task, datamodule=dm)  # the same labels as class-index PNGs
    with open(tmp_path / "test_volumes.csv") as fh:
        tested = list(csv.DictReader(fh))
    _, evaluated = evaluate(tmp_path / "predictions", semseg_root / "test")
    assert len(tested) == len(evaluated) == 2 and evaluated[-1]["volume"] == "mean"  # one test subject
    assert 0 < evaluated[0]["dice"] < 1  # not a trivial prediction
    for row_test, row_eval in zip(tested, evaluated, strict=True):
        assert list(row_test) == list(row_eval)
        assert row_test == {k: str(v) for k, v in row_eval.items()}  # the CSV holds repr-exact floats


def test_convert_command_runs_each_converter(semseg_root, tmp_path, capsys):
    h5 = semseg_root.parent / "oct.h5"
    assert convert_main(["h5-to-mirage", str(h5), str(tmp_path / "mirage"), "--seed", "0"]) == 0
    assert "wrote" in capsys.readouterr().out
    for split in ("train", "val", "test"):  # the same files as the fixture's convert_h5 call
        names = sorted(p.name for p in (tmp_path / "mirage" / split / "semseg").glob("*.png"))
        assert names == sorted(p.name for p in (semseg_root / split / "semseg").glob("*.png"))
    assert convert_main(["h5-to-mirage", str(h5), str(tmp_path / "mirage")]) == 1  # not empty
    assert "--overwrite" in capsys.readouterr().err
    args = ["synthetic", "drive", str(tmp_path / "drive"), "--n-train", "1", "--n-test", "1", "--size", "40", "48"]
    assert convert_main(args) == 0
    assert Image.open(tmp_path / "drive" / "training" / "images" / "21_training.tif").size == (48, 40)


def test_converter_help_shows_each_options_default(capsys):
    # a user choosing the split had to read the source for the fractions and seed it uses
    with pytest.raises(SystemExit):
        convert_main(["h5-to-mirage", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "share of subjects for val/ (default: 0.2)" in shown and "seed of the subject split (default: 42)" in shown


def test_converter_writes_one_cross_validation_fold_per_call(semseg_root, tmp_path):
    h5 = semseg_root.parent / "oct.h5"
    tested = []
    for fold in range(5):
        out = tmp_path / f"fold{fold}"
        assert convert_main(["h5-to-mirage", str(h5), str(out), "--num-folds", "5", "--fold", str(fold)]) == 0
        split = json.loads((out / "split.json").read_text())
        assert (split["num_folds"], split["fold"]) == (5, fold) and len(split["subjects"]["test"]) == 1
        assert not set(split["subjects"]["test"]) & set(split["subjects"]["train"] + split["subjects"]["val"])
        tested += split["subjects"]["test"]
    assert sorted(tested) == [1, 2, 3, 4, 5]  # each subject is test/ in exactly one fold
