"""A 2-process DDP run on CPU (gloo) logs the same validation metrics as one process."""

from __future__ import annotations

import csv

import pytest

from tests.conftest import REPO, TINY_VESSEL, run_octlightning

CONFIG = str(REPO / "hparams" / "vessel_unet.json")


def _last_val_row(metrics_csv):
    rows = [r for r in csv.DictReader(open(metrics_csv)) if r.get("val/dice")]
    return rows[-1]


@pytest.mark.slow
def test_ddp_validation_metrics_equal_a_single_process_computation(drive_root, tmp_path):
    common = [
        "--config", CONFIG, "--data.init_args.root", str(drive_root), *TINY_VESSEL,
        "--trainer.default_root_dir", str(tmp_path), "--comet", "false", "--overlay_every_n_epochs", "1",
        # 9 training images, 3 for validation: 2 ranks get 2 + 1, so a padding sampler would count one twice.
        "--data.init_args.val_fraction", "0.34", "--data.init_args.batch_size", "1",
        # Without batch norm every rank holds the same weights (SyncBatchNorm needs a GPU).
        "--model.init_args.net.init_args.batch_norm", "false",
    ]  # fmt: skip
    run_octlightning([
        "fit", *common, "--version", "ddp", "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--comet", "true",
        "--trainer.callbacks+=tests.fault_injection.CountStepCollectives",
    ])  # fmt: skip
    ddp_dir = tmp_path / "vessel_unet" / "ddp"
    assert len(list(ddp_dir.glob("*.zip"))) == 1, "one Comet experiment per run, not one per rank"
    # Logging the training loss costs no collective call per step; its epoch mean is reduced once.
    assert [(ddp_dir / f"step_all_reduce_rank{r}.txt").read_text() for r in (0, 1)] == ["0", "0"]
    assert any(r.get("train/loss_epoch") for r in csv.DictReader(open(ddp_dir / "metrics.csv")))
    # written by rank 0 alone, without a collective call the other rank never makes (it would hang)
    assert list((ddp_dir / "overlays" / "epoch_000").glob("*.png"))
    ddp = _last_val_row(ddp_dir / "metrics.csv")

    run_octlightning([
        "validate", *common, "--version", "single", "--ckpt_path", str(ddp_dir / "checkpoints" / "last.ckpt"),
    ])  # fmt: skip
    single = _last_val_row(tmp_path / "vessel_unet" / "single" / "metrics.csv")
    for key in ("val/dice", "val/iou", "val/accuracy", "val/sensitivity", "val/specificity", "val/auroc", "val/loss"):
        assert float(ddp[key]) == pytest.approx(float(single[key]), abs=1e-5), key

    # `test` on 2 ranks: the per-image table holds every test image exactly once, written by rank 0.
    run_octlightning([
        "test", *common, "--version", "ddp_test", "--ckpt_path", str(ddp_dir / "checkpoints" / "last.ckpt"),
        "--trainer.devices", "2", "--trainer.strategy", "ddp",
    ])  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "vessel_unet" / "ddp_test" / "test_metrics.csv")))
    assert [r["id"] for r in rows] == ["01", "02"]
