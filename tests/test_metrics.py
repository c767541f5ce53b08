import math

import torch
from torchmetrics.classification import MulticlassStatScores

from octlightning.metrics import confusion_counts, dice_iou_from_stat_scores, scores_from_counts


def test_multiclass_epoch_dice_skips_classes_absent_from_reference_and_prediction():
    stats = MulticlassStatScores(4, average="none")
    target = torch.tensor([0, 0, 1, 1, 1, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])  # class 1: tp 2, fp 1, fn 1; classes 2, 3 absent
    stats.update(pred, target)
    scores = dice_iou_from_stat_scores(stats.compute())
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
    # a class absent from both scores 1 per image (nothing to find, nothing found)
    assert float(scores_from_counts(confusion_counts(pred * 0, target * 0, valid, 2))["dice"][1]) == 1.0
