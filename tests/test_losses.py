import torch

from octlightning.losses import (
    CrossEntropyLoss,
    DiceLoss,
    GeneralizedDiceLoss,
    build_segmentation_loss,
    masked_regression_loss,
)


def test_dice_is_zero_for_a_perfect_binary_prediction_and_ignores_invalid_pixels():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 50
    assert DiceLoss()(logits, target) < 1e-3
    # Garbage outside the valid region changes nothing.
    valid = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    valid[..., :, :7] = True
    noisy = logits.clone()
    noisy[..., :, 7] = 50
    assert torch.allclose(DiceLoss()(noisy, target, valid), DiceLoss()(logits, target, valid))


def test_masked_bce_equals_bce_over_valid_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 6, 6)
    target = (torch.rand(2, 1, 6, 6) > 0.5).float()
    valid = torch.rand(2, 1, 6, 6) > 0.3
    got = CrossEntropyLoss()(logits, target, valid)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[valid], target[valid])
    assert torch.allclose(got, want, atol=1e-6)


def test_balanced_ce_weights_rare_classes_up():
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 5  # predicts background everywhere
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 2
    plain = CrossEntropyLoss()(logits, target)
    balanced = CrossEntropyLoss(class_weights="balanced")(logits, target)
    assert balanced > plain


def test_balanced_ce_counts_only_valid_pixels_and_present_classes():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6))  # class 3 absent: weight 0, no division by zero
    valid = torch.rand(2, 6, 6) > 0.3
    counts = torch.bincount(target[valid], minlength=4).float()
    weight = torch.tensor([counts.sum() / (3 * c) if c > 0 else 0.0 for c in counts])
    per_pixel = torch.nn.functional.cross_entropy(logits, target, weight=weight, reduction="none")
    want = per_pixel[valid].sum() / weight[target][valid].sum()
    got = CrossEntropyLoss(class_weights="balanced")(logits, target, valid)
    assert torch.allclose(got, want, atol=1e-6)


def test_generalized_dice_and_named_losses_run_multiclass():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    for name in ("dice_ce", "ce_gdice", "dice_balanced_ce", "iou"):
        loss = build_segmentation_loss(name)(logits, target)
        loss.backward()
        assert torch.isfinite(loss)
    perfect = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 100
    assert GeneralizedDiceLoss()(perfect, target) < 1e-3


def test_masked_regression_loss_equals_loss_over_valid_entries_and_has_no_nan_gradient():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[1.5, float("nan"), 2.0, float("nan")]])
    valid = ~torch.isnan(target)
    loss = masked_regression_loss(pred, target, valid, "mse")
    assert torch.isclose(loss, torch.tensor((0.25 + 1.0) / 2))
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0, 1] == 0 and pred.grad[0, 3] == 0
