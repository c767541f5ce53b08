"""Segmentation and regression losses.

Every segmentation loss takes raw logits ``(B, C, H, W)`` (``C == 1`` means binary, sigmoid), an
integer or {0,1} target ``(B, H, W)`` or ``(B, 1, H, W)``, and an optional ``valid`` mask of the same
spatial shape: pixels outside it (outside the field of view, padding) contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from octlightning.errors import ConfigError

_EPS = 1e-6


def _squeeze_target(target: Tensor) -> Tensor:
    return target[:, 0] if target.dim() == 4 else target


def _valid_or_ones(valid: Tensor | None, like: Tensor) -> Tensor:
    if valid is None:
        return torch.ones_like(like, dtype=torch.float32)
    return _squeeze_target(valid).to(torch.float32)


def _probs_and_onehot(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class probabilities and one-hot targets, both ``(B, K, H, W)`` float32."""
    target = _squeeze_target(target)
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits), target.unsqueeze(1).float()
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.long().clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float()
    return probs, onehot


def _soft_overlap(
    logits: Tensor, target: Tensor, valid: Tensor | None, include_background: bool
) -> tuple[Tensor, Tensor]:
    """Per-class soft intersection and soft sum ``|P| + |R|`` over the batch, inside ``valid``."""
    probs, onehot = _probs_and_onehot(logits, target)
    w = _valid_or_ones(valid, onehot[:, 0]).unsqueeze(1)
    if probs.shape[1] > 1 and not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, 2, 3)
    return (probs * onehot * w).sum(dims), ((probs + onehot) * w).sum(dims)


class DiceLoss(nn.Module):
    """Soft Dice loss (Milletari et al. 2016, V-Net, with the linear denominator ``|P| + |R|``).

    ``1 - (2 |P ∩ R| + smooth) / (|P| + |R| + smooth)`` per class, averaged over classes (foreground
    only for multi-class unless ``include_background``). Sums run over the whole batch and over the
    pixels inside ``valid``, which is stable for patches that hold no foreground.

    Args:
        include_background: count class 0 of a multi-class output too.
        smooth: added to numerator and denominator (an empty class in both gives loss 0).

    Shapes: logits ``(B, C, H, W)`` (``C == 1``: binary, sigmoid), target ``(B, H, W)`` or
    ``(B, 1, H, W)`` integer labels, valid like target (bool/0-1); returns a scalar float32.
    """

    def __init__(self, include_background: bool = False, smooth: float = 1.0) -> None:
        super().__init__()
        self.include_background = include_background
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        inter, total = _soft_overlap(logits, target, valid, self.include_background)
        return 1 - ((2 * inter + self.smooth) / (total + self.smooth)).mean()


class IoULoss(DiceLoss):
    """Soft Jaccard loss (Rahman & Wang 2016): ``1 - (|P ∩ R| + smooth) / (|P ∪ R| + smooth)``.

    Masked and averaged like :class:`DiceLoss`, with the same arguments and shapes.
    """

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        inter, total = _soft_overlap(logits, target, valid, self.include_background)
        # soft union |P ∪ R| = |P| + |R| - |P ∩ R|
        return 1 - ((inter + self.smooth) / (total - inter + self.smooth)).mean()


class GeneralizedDiceLoss(nn.Module):
    """Generalised Dice (Sudre et al. 2017): classes weighted by 1 / (reference volume)^2."""

    def __init__(self, smooth: float = 1e-5) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        probs, onehot = _probs_and_onehot(logits, target)
        w = _valid_or_ones(valid, onehot[:, 0]).unsqueeze(1)
        dims = (0, 2, 3)
        ref = (onehot * w).sum(dims)
        weights = 1.0 / (ref * ref).clamp_min(1.0)
        inter = (weights * (probs * onehot * w).sum(dims)).sum()
        denom = (weights * ((probs + onehot) * w).sum(dims)).sum()
        return 1 - (2 * inter + self.smooth) / (denom + self.smooth)


class CrossEntropyLoss(nn.Module):
    """BCE-with-logits for one output channel, softmax cross-entropy otherwise.

    ``class_weights="balanced"`` weights each class by the inverse of its pixel frequency in the
    batch (class-balanced CE, as in the RETOUCH recipe); a list gives fixed weights.
    """

    def __init__(self, class_weights: str | list[float] | None = None, pos_weight: float | None = None):
        super().__init__()
        self.class_weights = class_weights
        self.pos_weight = pos_weight

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        target = _squeeze_target(target)
        w = _valid_or_ones(valid, target)
        logits = logits.float()
        if logits.shape[1] == 1:
            pos_weight = None
            if self.pos_weight is not None:
                pos_weight = torch.tensor(self.pos_weight, device=logits.device)
            per_pixel = F.binary_cross_entropy_with_logits(
                logits[:, 0], target.float(), reduction="none", pos_weight=pos_weight
            )
            return (per_pixel * w).sum() / w.sum().clamp_min(1.0)
        weight = None
        if self.class_weights == "balanced":
            # Valid pixels per class, then total / (classes present x count) for the present classes.
            # Written without boolean indexing, which would make the GPU wait for the CPU every step.
            k = logits.shape[1]
            counts = torch.zeros(k, device=logits.device).scatter_add_(
                0, target.long().clamp(0, k - 1).flatten(), w.flatten()
            )
            present = counts > 0
            weight = torch.where(present, counts.sum() / (present.sum() * counts).clamp_min(_EPS), 0.0)
        elif self.class_weights is not None:
            weight = torch.as_tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        per_pixel = F.cross_entropy(logits, target.long(), weight=weight, reduction="none")
        if weight is not None:
            norm = (weight[target.long()] * w).sum()
        else:
            norm = w.sum()
        return (per_pixel * w).sum() / norm.clamp_min(_EPS)


class SumLoss(nn.Module):
    """Weighted sum of losses that share the (logits, target, valid) signature."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = weights or {}

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        return sum(self.weights.get(k, 1.0) * fn(logits, target, valid) for k, fn in self.losses.items())


SEGMENTATION_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "bce": lambda: CrossEntropyLoss(),
    "ce": lambda: CrossEntropyLoss(),
    "balanced_ce": lambda: CrossEntropyLoss(class_weights="balanced"),
    "dice": lambda: DiceLoss(),
    "iou": lambda: IoULoss(),
    "dice_bce": lambda: SumLoss({"dice": DiceLoss(), "bce": CrossEntropyLoss()}),
    "dice_ce": lambda: SumLoss({"dice": DiceLoss(), "ce": CrossEntropyLoss()}),
    "dice_balanced_ce": lambda: SumLoss({"dice": DiceLoss(), "ce": CrossEntropyLoss(class_weights="balanced")}),
    "ce_gdice": lambda: SumLoss({"ce": CrossEntropyLoss(), "gdice": GeneralizedDiceLoss()}),
}


def build_segmentation_loss(loss: str | nn.Module) -> nn.Module:
    """A segmentation loss: a name (a key of :data:`SEGMENTATION_LOSSES`) or a module, returned as is.

    In a config the module is given by ``class_path`` (e.g. ``octlightning.losses.DiceLoss`` with
    ``init_args: {smooth: 0.1}``, or a :class:`SumLoss` of several), so a recipe can set Dice smoothing
    or class weights without code. A module must take ``(logits, target, valid)`` like those here.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if isinstance(loss, nn.Module):
        return loss
    name = loss
    try:
        return SEGMENTATION_LOSSES[name]()
    except KeyError:
        raise ConfigError(
            f"--model.init_args.loss {name}: unknown loss; choose one of {sorted(SEGMENTATION_LOSSES)}"
        ) from None


def masked_regression_loss(pred: Tensor, target: Tensor, valid: Tensor, kind: str = "mse") -> Tensor:
    """Mean of an element-wise regression loss over the entries where ``valid`` is true.

    Unannotated (NaN) targets must be marked invalid; their values are replaced before the loss so
    that no NaN reaches the gradient.
    """
    valid = valid.bool()
    target = torch.where(valid, target, pred.detach())
    if kind == "mse":
        per = F.mse_loss(pred, target, reduction="none")
    elif kind == "l1":
        per = F.l1_loss(pred, target, reduction="none")
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"unknown regression loss {kind!r}; choose mse, l1 or smooth_l1")
    return (per * valid).sum() / valid.sum().clamp_min(1)


def row_cross_entropy(row_logits: Tensor, target: Tensor, valid: Tensor, sigma: float = 1.0) -> Tensor:
    """Cross-entropy between each column's predicted row distribution and a Gaussian around the truth.

    He et al., "Fully convolutional boundary regression for retina OCT segmentation", MICCAI 2019, and
    "Structured layer surface segmentation for retina OCT using fully convolutional regression
    networks", Medical Image Analysis 68:101856, 2021 train the column-wise softmax of the boundary
    logits with a cross-entropy against the true row. Here the target is a Gaussian of standard
    deviation ``sigma`` (input pixels) centred on the sub-pixel true row, normalised over the rows (a
    one-hot of the nearest row when ``sigma`` -> 0): resized targets fall between rows.

    Args:
        row_logits: ``(B, L, H, W)`` logits over the ``H`` input rows of each column.
        target: ``(B, L, W)`` true rows in input pixels (pixel centres), NaN allowed where invalid.
        valid: ``(B, L, W)`` bool, the annotated entries; the rest contribute nothing.
        sigma: the target's standard deviation in input pixels (> 0).

    Returns the mean over valid entries of ``-sum_r t(r) log softmax(logits)(r)`` (a scalar, nats;
    its minimum is the target's entropy, not 0).
    """
    if sigma <= 0:
        raise ConfigError(f"row_cross_entropy needs sigma > 0 (--model.init_args.target_sigma), not {sigma}")
    valid = valid.bool()
    y = torch.where(valid, target, torch.zeros_like(target)).float()
    rows = torch.arange(row_logits.shape[2], device=row_logits.device, dtype=torch.float32).view(1, 1, -1, 1)
    t = torch.softmax(-0.5 * ((rows - y.unsqueeze(2)) / sigma) ** 2, dim=2)
    per = -(t * row_logits.float().log_softmax(dim=2)).sum(dim=2)
    return (per * valid).sum() / valid.sum().clamp_min(1)


def boundary_regression_loss(
    rows: Tensor,
    target: Tensor,
    valid: Tensor,
    row_logits: Tensor | None = None,
    kind: str = "ce_l1",
    sigma: float = 1.0,
    ce_weight: float = 1.0,
) -> Tensor:
    """The layer-regression loss: ``kind`` ``mse``/``l1``/``smooth_l1`` on the rows, or ``ce_l1``.

    ``ce_l1`` (He et al. 2019, 2021): ``ce_weight`` x :func:`row_cross_entropy` of ``row_logits`` plus
    the L1 distance (input pixels) of the expected, ordered ``rows`` to the truth. He et al. used a
    smooth L1 on the expectation; with the targets' sub-pixel noise an L1 is as good and keeps the
    loss's units plain.

    Args:
        rows: ``(B, L, W)`` predicted rows in input pixels.
        target, valid: ``(B, L, W)`` true rows (input pixels) and their validity.
        row_logits: ``(B, L, H, W)``, needed by ``ce_l1``.

    Raises:
        ValueError: an unknown ``kind``.
        ConfigError: ``ce_l1`` without ``row_logits`` (a pooling head).
    """
    if kind != "ce_l1":
        return masked_regression_loss(rows, target, valid, kind)
    if row_logits is None:
        raise ConfigError(
            "--model.init_args.loss ce_l1 needs a network that returns row_logits "
            "(--model.init_args.net.init_args.head soft_argmax); use mse or l1 with the pool head"
        )
    l1 = masked_regression_loss(rows, target, valid, "l1")
    return l1 + ce_weight * row_cross_entropy(row_logits, target, valid, sigma)
