"""Column-wise soft-argmax: per boundary and column a distribution over rows, its expectation the row.

Following He et al., "Fully convolutional boundary regression for retina OCT segmentation" (MICCAI
2019) and "Structured layer surface segmentation for retina OCT using fully convolutional regression
networks" (Medical Image Analysis 68:101856, 2021): a fully convolutional network outputs, for each
boundary, a logit map over the B-scan; a softmax over the rows of every column gives the boundary's
position distribution there, and its expectation (soft-argmax) is the sub-pixel row. Keeping the row
axis until this last step is what lets a randomly initialised network localise the boundary (a head
that averages the feature height away has to regress absolute rows from position-free features).
Order is guaranteed by construction, as in He et al.'s topology module: boundary ``k`` is boundary
``k - 1`` plus ``ReLU`` of how far below it its own expectation lies, so boundaries never cross.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def order_boundaries(rows: Tensor) -> Tensor:
    """Make rows ``(B, L, W)`` non-decreasing along ``L`` (top boundary first), differentiably.

    ``s_0 = r_0``, ``s_k = s_{k-1} + relu(r_k - s_{k-1})`` (He et al. 2021, topology guarantee):
    a boundary already below the one above is unchanged; one above it is placed on it.
    """
    out = [rows[:, 0]]
    for k in range(1, rows.shape[1]):
        out.append(out[-1] + F.relu(rows[:, k] - out[-1]))
    return torch.stack(out, dim=1)


def soft_argmax_rows(row_logits: Tensor) -> Tensor:
    """Expected row ``(B, L, W)`` in pixels (row ``i`` = centre of pixel ``i``) of ``(B, L, H, W)`` logits."""
    probs = row_logits.float().softmax(dim=2)
    index = torch.arange(row_logits.shape[2], device=row_logits.device, dtype=probs.dtype)
    return (probs * index.view(1, 1, -1, 1)).sum(dim=2)


class ColumnSoftArgmax(nn.Module):
    """Boundary logits ``(B, L, h, w)`` -> ordered rows and the row logits they came from.

    The logits (any resolution; 1/4 of the input for SegFormer, full for a U-Net) are resized
    bilinearly (pixel-centre convention, ``align_corners=False``) to ``(height, output_width)``: one
    logit per input row and predicted column. Returns a dict:

    - ``rows``: ``(B, L, output_width)`` float32, ordered top to bottom, as a *fraction of the input
      height* (row in input pixels / ``height``), the contract every layer-regression net follows;
    - ``row_logits``: ``(B, L, height, output_width)``, unnormalised log-probabilities over the input
      rows of each column, before ordering (what the cross-entropy of
      :func:`~octlightning.losses.row_cross_entropy` trains).

    Args:
        output_width: columns predicted.
        order: apply :func:`order_boundaries` (set False only to study unordered predictions).
    """

    def __init__(self, output_width: int, order: bool = True) -> None:
        super().__init__()
        self.output_width = output_width
        self.order = order

    def forward(self, logits: Tensor, height: int) -> dict[str, Tensor]:
        if logits.shape[-2:] != (height, self.output_width):
            logits = F.interpolate(logits, size=(height, self.output_width), mode="bilinear", align_corners=False)
        rows = soft_argmax_rows(logits)
        if self.order:
            rows = order_boundaries(rows)
        return {"rows": rows / height, "row_logits": logits}
