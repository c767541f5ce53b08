import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassStatScores

from octlightning.metrics import (
    SliceCounts,
    boundary_errors_by_subject,
    confusion_counts,
    counts_from_stat_scores,
    score_volumes,
    scores_from_counts,
)


def test_multiclass_epoch_dice_skips_classes_absent_from_reference_and_prediction():
    stats = MulticlassStatScores(4, average="none")
    target = torch.tensor([0, 0, 1, 1, 1, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])  # class 1: tp 2, fp 1, fn 1; classes 2, 3 absent
    stats.update(pred, target)
    counts = counts_from_stat_scores(stats.compute())
    # the epoch counts are the per-image counts: one counting for every table
    assert torch.equal(counts, confusion_counts(pred, target, target >= 0, 4))
    scores = scores_from_counts(counts)
    assert math.isclose(float(scores["dice"][1]), 4 / 6)
    assert math.isclose(float(scores["iou"][1]), 2 / 4)
    assert torch.isnan(scores["dice"][2:]).all()
    assert math.isclose(float(scores["dice"][1:].nanmean()), 4 / 6)


def test_per_image_scores_from_counts_inside_the_valid_region():
    target = torch.tensor([[0, 1], [1, 1]])
    pred = torch.tensor([[1, 1], [0, 1]])
    valid = torch.tensor([[False, True], [True, True]])  # the false positive at (0, 0) is outside
    scores = scores_from_counts(confusion_counts(pred, target, valid, 2))
    assert math.isclose(float(scores["dice"][1]), 2 * 2 / (2 * 2 + 0 + 1))
    assert math.isclose(float(scores["sensitivity"][1]), 2 / 3)
    # a class absent from both has no score per image either (nnU-Net's NaN), as in the epoch logs
    empty = scores_from_counts(confusion_counts(pred * 0, target * 0, valid, 2))
    assert math.isnan(float(empty["dice"][1])) and math.isnan(float(empty["iou"][1]))
    assert math.isnan(float(empty["sensitivity"][1])) and float(empty["specificity"][1]) == 1.0


def test_volume_scores_sum_counts_average_hd95_and_give_retouch_volumes():
    # volume "b": two B-scans of 2x2 pixels; "a": one. Class 1 only (binary).
    t = torch.tensor([[1, 1], [0, 0]])
    slices = [
        SliceCounts("b", confusion_counts(torch.tensor([[1, 0], [0, 0]]), t, t >= 0, 2), np.array([1.0]), 0.5),
        SliceCounts("b", confusion_counts(torch.tensor([[1, 1], [1, 0]]), t, t >= 0, 2), np.array([3.0]), 0.5),
        SliceCounts("a", confusion_counts(t, t, t >= 0, 2), np.array([0.0]), None),
    ]
    a, b = score_volumes(slices)
    assert (a["volume"], a["slices"], a["dice"], a["hd95_px"]) == ("a", 1, 1.0, 0.0)
    assert "avd_mm3_foreground" not in a  # one B-scan without a voxel size: no volume for "a"
    # "b": tp 1 + 2, fp 0 + 1, fn 1 + 0 summed before the ratio, not the mean of per-slice Dice
    assert (b["volume"], b["slices"]) == ("b", 2)
    assert math.isclose(b["dice"], 2 * 3 / (2 * 3 + 1 + 1)) and math.isclose(b["iou"], 3 / 5)
    assert b["hd95_px"] == 2.0
    assert (b["ref_mm3_foreground"], b["pred_mm3_foreground"], b["avd_mm3_foreground"]) == (2.0, 2.0, 0.0)
    named = score_volumes(slices[2:], ["lesion"])[0]
    assert list(named) == ["volume", "slices", "dice", "dice_lesion", "iou", "iou_lesion", "sensitivity",
                           "sensitivity_lesion", "specificity", "specificity_lesion", "accuracy",
                           "accuracy_lesion", "hd95_px", "hd95_px_lesion"]  # fmt: skip
    with pytest.raises(ValueError, match="HD95 given for 1 of 2"):
        score_volumes([slices[0], SliceCounts("b", slices[1].counts)])


def test_volume_hd95_skips_slices_where_the_class_is_absent_from_both():
    t = torch.tensor([[1, 1], [0, 0]])
    slices = [
        SliceCounts("v", confusion_counts(t, t, t >= 0, 2), np.array([2.0])),
        SliceCounts("v", confusion_counts(t * 0, t * 0, t >= 0, 2), np.array([np.nan])),
    ]
    (v,) = score_volumes(slices, hd95_unit="mm")
    assert v["hd95_mm"] == 2.0 and v["dice"] == 1.0


def test_subject_boundary_errors_pool_every_annotated_a_scan_of_the_subject():
    rows = [
        {"id": "a", "subject": "10", "mae_px_ILM": 2.0, "columns_ILM": 10, "mae_px_BM": 1.0, "columns_BM": 10},
        {"id": "b", "subject": "10", "mae_px_ILM": 4.0, "columns_ILM": 30, "mae_px_BM": 3.0, "columns_BM": 10},
        {"id": "c", "subject": "2", "mae_px_ILM": float("nan"), "columns_ILM": 0, "mae_px_BM": 5.0, "columns_BM": 4},
        {"id": "d", "mae_px_ILM": 9.0, "columns_ILM": 4, "mae_px_BM": 9.0, "columns_BM": 4},  # no subject
    ]
    two, ten = boundary_errors_by_subject(rows, ["ILM", "BM"])  # "2" before "10"
    assert (two["subject"], two["bscans"], ten["subject"], ten["bscans"]) == ("2", 1, "10", 2)
    # a B-scan's mean counts by its columns: (2 * 10 + 4 * 30) / 40, not (2 + 4) / 2
    assert ten["mae_px_ILM"] == pytest.approx(3.5) and ten["mae_px_BM"] == pytest.approx(2.0)
    assert ten["mae_px"] == pytest.approx(2.75) and (ten["columns_ILM"], ten["columns_BM"]) == (40, 20)
    assert np.isnan(two["mae_px_ILM"]) and two["mae_px"] == pytest.approx(5.0)  # no ILM column annotated
    assert "mae_um" not in ten  # no micrometre values, no micrometre columns
    assert boundary_errors_by_subject(rows[3:], ["ILM", "BM"]) == []
