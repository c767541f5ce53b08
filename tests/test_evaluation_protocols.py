"""Issue 14: test scores computed as the published protocols compute them (ISIC original size, exact DRIVE
AUROC, one absent-class convention, HD95 units, MIRAGE's own protocol and prediction format)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from octlightning.callbacks import ThresholdedJaccard, WriteMiragePredictions
from octlightning.data.fundus import FundusVesselDataModule
from octlightning.data.mask_folder import MaskFolderDataModule
from octlightning.data.oct_semseg import OCTSemSegDataModule
from octlightning.evaluate import evaluate, evaluate_mirage
from octlightning.metrics import hausdorff_percentile, hd95_per_class, mirage_volume_scores
from octlightning.tasks.segmentation import SegmentationTask
from tests.fixtures.mirage import write_mirage_layout


class ConstantLogits(nn.Module):
    """A 'network' whose output is a fixed logit map, whatever the input: predictions are known exactly."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits.float())
        self.bias = nn.Parameter(torch.zeros(()))  # an optimiser needs one parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], *self.logits.shape) + 0 * self.bias


def _trainer(tmp_path: Path, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, callbacks=list(callbacks),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ----------------------------------------------------------------------------- 1. ISIC at original size
def test_isic_test_scores_at_each_images_original_size(tmp_path):
    # One 2 x 4 image whose lesion is the left three columns; the network sees it at 2 x 2.
    root = tmp_path / "isic"
    for sub in ("train", "train_masks", "test", "test_masks"):
        (root / sub).mkdir(parents=True)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=np.uint8) * 255
    for folder in ("train", "test"):
        Image.fromarray(np.full((2, 4, 3), 128, np.uint8)).save(root / folder / "a.png")
        Image.fromarray(mask).save(root / f"{folder}_masks" / "a_segmentation.png")
    dm = MaskFolderDataModule(
        str(root), batch_size=1, num_workers=0, image_dir="train", mask_dir="train_masks", val_image_dir=None,
        test_image_dir="test", test_mask_dir="test_masks", image_glob="*.png", image_size=(2, 2), augment=False,
    )  # fmt: skip
    # Probabilities 0.9 | 0.1 at 2 x 2. Upsampled bilinearly (align_corners=False) to 2 x 4, the columns
    # are 0.9, 0.7, 0.3, 0.1 -> prediction = left two columns. Against the stored mask: tp 4, fp 0,
    # fn 2 -> Dice 8/10, IoU 4/6 (>= 0.65: kept). At 2 x 2 against the resized mask (the old protocol) the
    # reference would be all lesion and Dice 2/3.
    logits = torch.tensor([[[_logit(0.9), _logit(0.1)], [_logit(0.9), _logit(0.1)]]])
    task = SegmentationTask(ConstantLogits(logits), auroc=False, channels_last=False)
    trainer = _trainer(tmp_path, [ThresholdedJaccard()])
    trainer.test(task, datamodule=dm, verbose=False)
    (row,) = _rows(tmp_path / "test_metrics.csv")
    assert float(row["dice"]) == pytest.approx(0.8)
    assert float(row["iou"]) == pytest.approx(4 / 6)
    assert float(row["thresholded_jaccard"]) == pytest.approx(4 / 6)
    assert float(trainer.callback_metrics["test/dice"]) == pytest.approx(0.8)
    assert float(trainer.callback_metrics["test/thresholded_jaccard"]) == pytest.approx(4 / 6)
    # `predict` writes exactly the mask that was scored
    trainer.predict(task, datamodule=dm)
    written = np.asarray(Image.open(tmp_path / "predictions" / "a_mask.png")) > 0
    assert written.tolist() == [[True, True, False, False]] * 2


# ----------------------------------------------------------------------------- 2. exact AUROC on FOV pixels
def _fundus_like_batches(n: int = 3, size: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        image = torch.rand(1, size, size, generator=g)
        mask = (torch.rand(1, size, size, generator=g) < 0.3).long()
        fov = torch.zeros(1, size, size, dtype=torch.uint8)
        fov[:, 1:-1, 2:-2] = 1
        samples.append({"image": image, "mask": mask, "fov": fov, "id": f"{i:02d}", "size": torch.tensor([size, size])})
    return samples


def test_test_auroc_is_exact_over_fov_pixels(tmp_path):
    metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    task = SegmentationTask(net, channels_last=False)
    samples = _fundus_like_batches()
    loader = torch.utils.data.DataLoader(samples, batch_size=2)
    trainer = _trainer(tmp_path)
    trainer.test(task, dataloaders=loader, verbose=False)
    with torch.no_grad():
        probs = [torch.sigmoid(net(s["image"][None]))[0, 0] for s in samples]
    inside = [s["fov"][0] > 0 for s in samples]
    y = np.concatenate([s["mask"][0][m].numpy() for s, m in zip(samples, inside, strict=True)])
    p = np.concatenate([pr[m].numpy() for pr, m in zip(probs, inside, strict=True)])
    assert float(trainer.callback_metrics["test/auroc"]) == pytest.approx(metrics.roc_auc_score(y, p), abs=1e-6)
    for row, s, pr, m in zip(_rows(tmp_path / "test_metrics.csv"), samples, probs, inside, strict=True):
        expected = metrics.roc_auc_score(s["mask"][0][m].numpy(), pr[m].numpy())
        assert float(row["auroc"]) == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- 3. absent classes
def test_empty_reference_and_empty_prediction_score_the_same_in_logs_and_csv(tmp_path):
    sample = {"image": torch.zeros(1, 4, 4), "mask": torch.zeros(1, 4, 4, dtype=torch.long), "id": "empty"}
    task = SegmentationTask(ConstantLogits(torch.full((1, 4, 4), -5.0)), auroc=False, channels_last=False)
    trainer = _trainer(tmp_path)
    loader = torch.utils.data.DataLoader([sample], batch_size=1)
    trainer.test(task, dataloaders=loader, verbose=False)
    (row,) = _rows(tmp_path / "test_metrics.csv")
    assert math.isnan(float(row["dice"])) and math.isnan(float(row["iou"]))
    assert math.isnan(float(trainer.callback_metrics["test/dice"]))  # was 0 in the log and 1 in the CSV
    trainer.validate(task, dataloaders=loader, verbose=False)
    assert math.isnan(float(trainer.callback_metrics["val/dice"]))


def _hand_made_mirage(root: Path, prediction: np.ndarray | None = None) -> tuple[Path, Path]:
    """INFO.json with background, A (value 100), B (value 200), invalid (255); one volume of one B-scan
    holding A only; the prediction (class indices) equals the reference unless given."""
    (root / "semseg").mkdir(parents=True)
    info = {"0": {"value": 0, "label": "Background"}, "1": {"value": 100, "label": "A"},
            "2": {"value": 200, "label": "B"}, "3": {"value": 255, "label": "Invalid"}}  # fmt: skip
    (root / "INFO.json").write_text(json.dumps(info))
    ref = np.zeros((8, 10), np.uint8)
    ref[2:5, 3:7] = 100
    ref[7, :] = 255  # unannotated row
    Image.fromarray(ref).save(root / "semseg" / "vol_000.png")
    labels = (ref == 100).astype(np.uint8) if prediction is None else prediction
    preds = root / "preds"
    preds.mkdir()
    Image.fromarray(labels).save(preds / "vol_000_mask.png")
    values = np.array([0, 100, 200], np.uint8)[labels]
    Image.fromarray(values).save(preds / "vol_000_pred.png")
    return root, preds


def test_absent_class_is_nan_in_evaluate_and_mirage_protocol_gives_its_own_zero(tmp_path):
    root, preds = _hand_made_mirage(tmp_path / "ds")
    rows, volumes = evaluate(preds, root)
    image = rows[0]
    assert image["dice_A"] == 1.0 and math.isnan(image["dice_B"]) and math.isnan(image["hd95_px_B"])
    assert image["dice"] == 1.0 and image["hd95_px"] == 0.0  # the mean skips the absent class
    assert volumes[0]["dice"] == 1.0 and math.isnan(volumes[0]["dice_B"])
    # MIRAGE's published protocol: Dice 2I/(|P|+|R|+1e-6) -> 0 for the absent class, HD95 0 (both empty)
    mirage = evaluate_mirage(preds, root)
    assert [(r["ID"], r["Class"]) for r in mirage] == [("vol", "A"), ("vol", "B"), ("mean", "all")]
    assert mirage[0]["Dice"] == pytest.approx(2 * 12 / (24 + 1e-6)) and mirage[1]["Dice"] == 0.0
    assert mirage[1]["HD95"] == 0.0 and mirage[-1]["Dice"] == pytest.approx(0.5, abs=1e-6)


def test_mirage_protocol_skips_invalid_reference_pixels_and_gives_the_diagonal_for_a_missed_class(tmp_path):
    prediction = np.zeros((8, 10), np.uint8)
    prediction[7, :] = 2  # B predicted only where the reference is unannotated: does not count
    root, preds = _hand_made_mirage(tmp_path / "ds", prediction)
    a, b, _ = evaluate_mirage(preds, root)
    assert a["Dice"] == 0.0 and a["HD95"] == pytest.approx(math.hypot(8, 10))  # A missed entirely
    assert b["Dice"] == 0.0 and b["HD95"] == 0.0


# ----------------------------------------------------------------------------- 4. units and binarisation
def test_hd95_accepts_a_scalar_spacing_and_reports_physical_units():
    ref = np.zeros((20, 20), np.int64)
    ref[5:10, 5:10] = 1
    pred = np.roll(ref, 3, axis=0)
    isotropic = hd95_per_class(pred, ref, 2, spacing=0.5)  # was an IndexError
    assert isotropic.tolist() == hd95_per_class(pred, ref, 2, spacing=(0.5, 0.5)).tolist() == [1.5]
    assert hd95_per_class(pred, ref, 2, spacing=(2.0, 1.0))[0] == pytest.approx(6.0)  # 3 rows of 2 mm
    only_ref = hd95_per_class(np.zeros_like(ref), ref, 2, spacing=(2.0, 1.0))[0]
    assert only_ref == pytest.approx(math.hypot(40, 20))  # the diagonal, in mm


def test_thresholded_jaccard_keeps_065_in_every_float_precision():
    from octlightning.metrics import thresholded_jaccard

    for dtype in (torch.float16, torch.float32, torch.float64):
        assert float(thresholded_jaccard(torch.tensor([0.65], dtype=dtype))[0]) > 0.6
    assert float(thresholded_jaccard(np.float32([0.65]))[0]) > 0.6


def test_probability_at_the_threshold_is_foreground_in_masks_rows_and_epoch_metrics(tmp_path):
    # sigmoid(0) = 0.5 = threshold exactly: p >= t is foreground everywhere (torchmetrics alone says p > t)
    sample = {"image": torch.zeros(1, 2, 2), "mask": torch.ones(1, 2, 2, dtype=torch.long), "id": "half"}
    task = SegmentationTask(ConstantLogits(torch.zeros(1, 2, 2)), auroc=False, channels_last=False)
    trainer = _trainer(tmp_path)
    loader = torch.utils.data.DataLoader([sample], batch_size=1)
    trainer.test(task, dataloaders=loader, verbose=False)
    assert float(_rows(tmp_path / "test_metrics.csv")[0]["dice"]) == 1.0
    assert float(trainer.callback_metrics["test/dice"]) == 1.0
    trainer.predict(task, dataloaders=loader)
    assert (np.asarray(Image.open(tmp_path / "predictions" / "half_mask.png")) == 255).all()


def test_volume_hd95_is_in_mm_where_samples_carry_the_spacing(tmp_path):
    ref = torch.zeros(1, 16, 16, dtype=torch.long)
    ref[0, 4:8, 4:8] = 1
    logits = torch.full((1, 16, 16), -5.0)
    logits[0, 6:10, 4:8] = 5.0  # the reference shifted down by 2 rows
    samples = [
        {"image": torch.zeros(1, 16, 16), "mask": ref, "id": f"case_{z:03d}", "volume": "case",
         "size": torch.tensor([16, 16]), "spacing": torch.tensor([0.01, 0.004, 0.1], dtype=torch.float64),
         "voxel_mm3": 0.01 * 0.004 * 0.1}
        for z in range(2)
    ]  # fmt: skip
    task = SegmentationTask(ConstantLogits(logits), auroc=False, hd95=True, channels_last=False)
    _trainer(tmp_path).test(task, dataloaders=torch.utils.data.DataLoader(samples, batch_size=2), verbose=False)
    row = _rows(tmp_path / "test_metrics.csv")[0]
    assert "hd95_px" not in row and float(row["hd95_mm"]) == pytest.approx(2 * 0.004)  # 2 rows of y spacing
    (volume, _) = _rows(tmp_path / "test_volumes.csv")
    assert float(volume["hd95_mm"]) == pytest.approx(0.008)


# ----------------------------------------------------------------------------- 5. HD95 equals MONAI's
@pytest.mark.parametrize("spacing", [None, (1.0, 1.0), (3.9, 11.7), (0.5, 2.0)])
def test_hd95_equals_monai_with_anisotropic_spacing(spacing):
    monai = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(3)
    for _ in range(5):
        pred = np.zeros((40, 50), bool)
        ref = np.zeros((40, 50), bool)
        for mask in (pred, ref):
            for _ in range(3):
                r, c = rng.integers(0, 36), rng.integers(0, 46)
                mask[r : r + rng.integers(2, 12), c : c + rng.integers(2, 15)] = True
        ours = hausdorff_percentile(pred, ref, 95, spacing)
        one_hot = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (pred, ref)]
        theirs = float(monai.compute_hausdorff_distance(*one_hot, percentile=95, spacing=spacing)[0, 0])
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_mirage_volume_hd95_is_monai_as_mirage_calls_it():
    monai = pytest.importorskip("monai.metrics")
    ref = np.zeros((2, 20, 30), np.uint8)
    ref[:, 5:12, 4:20] = 7
    pred = np.zeros_like(ref)
    pred[0, 7:14, 6:25] = 7
    pred[1, 5:12, 4:20] = 7
    hd = []
    for p, r in zip(pred == 7, ref == 7, strict=True):
        one_hot = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (p, r)]
        hd.append(float(monai.compute_hausdorff_distance(*one_hot, percentile=95)[0, 0]))
    assert mirage_volume_scores(pred, ref, 7)["HD95"] == pytest.approx(np.mean(hd), rel=1e-5)


# ----------------------------------------------------------------------------- 6. prediction files
def test_prediction_files_take_the_input_stem_from_a_split_or_predict_dir(drive_root, tmp_path):
    task = SegmentationTask(nn.Conv2d(3, 1, 1), auroc=False, channels_last=False)
    names = {}
    for how, extra in (("split", {}), ("folder", {"predict_dir": str(drive_root / "test" / "images")})):
        dm = FundusVesselDataModule(str(drive_root), batch_size=1, num_workers=0, **extra)
        out = tmp_path / how
        _trainer(out).predict(task, datamodule=dm)
        names[how] = sorted(p.name for p in (out / "predictions").glob("*.png"))
    assert names["split"] == names["folder"]
    stems = sorted(p.stem for p in (drive_root / "test" / "images").iterdir())
    assert names["split"] == sorted(f"{s}_{k}.png" for s in stems for k in ("mask", "overlay", "prob"))


def test_predict_writes_mirage_format_that_mirage_protocol_scores(tmp_path):
    root = write_mirage_layout(tmp_path / "ds", ["Background", "A", "B"], [0, 120, 240])
    dm = OCTSemSegDataModule(str(root), batch_size=2, num_workers=0)
    torch.manual_seed(0)
    task = SegmentationTask(nn.Conv2d(1, 3, 3, padding=1), num_classes=3, loss="dice_ce", class_names=["A", "B"],
                            channels_last=False)  # fmt: skip
    writer = WriteMiragePredictions()
    _trainer(tmp_path / "run", [writer]).predict(task, datamodule=dm)
    refs = sorted((root / "test" / "semseg").glob("*.png"))
    assert sorted(p.name for p in writer.written) == [f"{r.stem}_pred.png" for r in refs]
    for ref, pred in zip(refs, sorted(writer.written), strict=True):
        values = np.asarray(Image.open(pred))
        assert values.shape == np.asarray(Image.open(ref)).shape and set(np.unique(values)) <= {0, 120, 240}
    rows = evaluate_mirage(tmp_path / "run" / "preds", root / "test")
    assert [r["Class"] for r in rows] == ["A", "B", "all"]
    # the same predictions as class indices score identically through the default protocol's counts
    mirage_dice_a = rows[0]["Dice"]
    masks = {r.stem: np.asarray(Image.open(tmp_path / "run" / "preds" / f"{r.stem}_pred.png")) for r in refs}
    ref_a = np.stack([np.asarray(Image.open(r)) == 120 for r in refs])
    pred_a = np.stack([masks[r.stem] == 120 for r in refs])
    assert mirage_dice_a == pytest.approx(2 * (ref_a & pred_a).sum() / (ref_a.sum() + pred_a.sum() + 1e-6))
