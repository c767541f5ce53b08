"""OCT layer-boundary regression: one row per column per boundary, NaN-masked losses and metrics.

Any ``nn.Module`` mapping ``(B, C, H, W)`` to rows as fractions of the input height can be trained:
either a tensor ``(B, L, W_out)`` or a dict ``{"rows": (B, L, W_out), "row_logits": (B, L, H, W_out)}``
(the soft-argmax heads of :mod:`octlightning.models.layer_regression`, trained with the row
cross-entropy + L1 of :func:`~octlightning.losses.boundary_regression_loss`). Batches
are dicts with ``image``, ``coords`` ``(B, L, W_out)`` rows in input pixels (NaN where unannotated),
``valid`` ``(B, L, W_out)``, ``size`` (original height, width), ``spacing_um`` (axial um per original
pixel, NaN when unknown), ``id`` and optionally ``subject`` (see
:mod:`octlightning.data.oct_layers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from octlightning.data.coords import resample_columns, rescale_rows
from octlightning.errors import ConfigError
from octlightning.losses import boundary_regression_loss
from octlightning.metrics import BoundaryError, boundary_abs_errors, boundary_errors_by_subject
from octlightning.tasks.base import BaseTask
from octlightning.visualize import PALETTE, save_png, to_display


def draw_boundaries(
    image: np.ndarray,
    rows: np.ndarray,
    valid: np.ndarray | None = None,
    colors: list[tuple[int, int, int]] | None = None,
    width: int = 1,
) -> np.ndarray:
    """Draw boundaries ``(L, W_out)`` (rows in ``image`` pixels) as polylines over an ``(H, W, 3)`` image.

    Columns are placed with the resize convention (column ``j`` of ``W_out`` at
    ``(j + 0.5) * W / W_out - 0.5``); lines break at invalid (unannotated) columns.
    """
    h, w = image.shape[:2]
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    rows = np.asarray(rows, dtype=np.float64)
    ok = np.isfinite(rows) if valid is None else np.asarray(valid, dtype=bool) & np.isfinite(rows)
    xs = (np.arange(rows.shape[-1]) + 0.5) * w / rows.shape[-1] - 0.5
    for k in range(rows.shape[0]):
        color = colors[k] if colors else tuple(int(c) for c in PALETTE[1 + k % (len(PALETTE) - 1)])
        run: list[tuple[float, float]] = []
        for x, y, good in zip(xs, rows[k], ok[k], strict=True):
            if good:
                run.append((float(x), float(y)))
            if (not good or x == xs[-1]) and run:
                if len(run) == 1:
                    draw.point(run, fill=color)
                else:
                    draw.line(run, fill=color, width=width)
                run = []
    return np.asarray(canvas)


class LayerRegressionTask(BaseTask):
    """Boundary-row regression LightningModule.

    The loss compares rows in network-input pixels over annotated columns only
    (:func:`~octlightning.losses.masked_regression_loss`); metrics are in pixels of the *original*
    image and in micrometres: ``{stage}/mae_px`` (mean over boundaries, the checkpoint monitor),
    ``{stage}/mae_px_<name>``, ``{stage}/mae_um[_<name>]`` and ``{stage}/thickness_mae_px|um`` for the
    thickness between the ``thickness_between`` boundaries (ILM -> BM by default).

    Args:
        net: network returning ``(B, L, W_out)`` rows as fractions of the input height, or a dict with
            those ``rows`` and ``row_logits`` ``(B, L, H, W_out)`` (see the module docstring).
        boundary_names: one name per predicted boundary, top first (metric and CSV column names);
            default ``["ILM", "BM"]``.
        loss: ``ce_l1`` (row cross-entropy + L1 on the expected row, He et al. 2019/2021; needs
            ``row_logits``; the published default), ``mse``, ``l1`` or ``smooth_l1`` (beta = 1 input
            pixel) on the rows.
        target_sigma: ``ce_l1``: standard deviation (input pixels) of the Gaussian row target.
        ce_weight: ``ce_l1``: weight of the cross-entropy against the L1 (input pixels).
        order_weight: weight of a penalty on boundaries out of anatomical order (each boundary should
            lie at or below the one above it, e.g. BM below ILM): mean squared violation in pixels.
        thickness_between: indices (into ``boundary_names``) of the upper and lower boundary whose
            distance is the thickness; ``None`` disables thickness metrics and outputs.
        mc_samples: at ``predict``, run the network this many times with its dropout active and
            write the mean and standard deviation (MC dropout; the net needs ``dropout > 0``).
        monitor: checkpoint / early-stopping metric (``val/mae_px``).
        monitor_mode: ``min``: a smaller boundary error is better.
        lr, weight_decay, optimizer, scheduler, warmup_epochs, channels_last, compile: see
            :class:`~octlightning.tasks.base.BaseTask`.
    """

    def __init__(
        self,
        net: nn.Module,
        boundary_names: list[str] | None = None,
        loss: Literal["ce_l1", "mse", "l1", "smooth_l1"] = "ce_l1",
        target_sigma: float = 1.0,
        ce_weight: float = 1.0,
        order_weight: float = 0.0,
        thickness_between: tuple[int, int] | None = (0, -1),
        mc_samples: int = 0,
        monitor: str = "val/mae_px",
        monitor_mode: Literal["min", "max"] = "min",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        optimizer: Literal["adam", "adamw", "sgd"] = "adamw",
        scheduler: Literal["none", "cosine", "plateau", "step"] = "none",
        warmup_epochs: int = 0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__(
            net, monitor=monitor, monitor_mode=monitor_mode, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
            scheduler=scheduler, warmup_epochs=warmup_epochs, channels_last=channels_last, compile=compile,
        )  # fmt: skip
        # mc_samples is a prediction-time choice: kept out of the checkpoint's hyperparameters, which
        # LightningCLI would otherwise apply over the command line when given --ckpt_path.
        self.save_hyperparameters(ignore=["net", "mc_samples"])
        if loss not in ("ce_l1", "mse", "l1", "smooth_l1"):
            raise ValueError(f"unknown regression loss {loss!r}; choose ce_l1, mse, l1 or smooth_l1")
        self.boundary_names = list(boundary_names or ["ILM", "BM"])
        n = len(self.boundary_names)
        self.loss_kind = loss
        self.target_sigma, self.ce_weight = target_sigma, ce_weight
        self.order_weight = order_weight
        self.thickness_between: tuple[int, int] | None = None
        if thickness_between is not None and n > 1:
            up, low = (int(k) % n for k in thickness_between)
            if up == low:
                raise ConfigError(
                    f"--model.init_args.thickness_between {list(thickness_between)} names one boundary twice; give "
                    f"two of the {n} boundaries {self.boundary_names} by index (0 to {n - 1}, -1 the last)"
                )
            self.thickness_between = (up, low)
        self.mc_samples = mc_samples
        # Checked here, so that a contradiction stops before a run folder is made (not at the first batch).
        if mc_samples > 0 and not _dropouts(net):
            raise ConfigError(MC_WITHOUT_DROPOUT)
        if loss == "ce_l1" and getattr(net, "head_kind", None) == "pool":
            raise ConfigError(
                "--model.init_args.loss ce_l1 needs the row logits of the soft_argmax head, and the net's head is "
                "pool (--model.init_args.net.init_args.head): use soft_argmax, or loss mse or l1 with pool"
            )
        self.val_metrics = BoundaryError(n, self.thickness_between)
        self.test_metrics = BoundaryError(n, self.thickness_between)

    # ----------------------------------------------------------------- helpers
    def forward(self, x: Tensor) -> Tensor:
        """Rows in input pixels ``(B, L, W_out)``."""
        return self.predict_rows(x)[0]

    def predict_rows(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows in input pixels ``(B, L, W_out)`` float32 and the row logits ``(B, L, H, W_out)`` (or None)."""
        out = self.run_net(x)
        if isinstance(out, dict):
            return out["rows"].float() * x.shape[-2], out.get("row_logits")
        return out.float() * x.shape[-2], None

    def _check(self, pred: Tensor, batch: dict[str, Any]) -> None:
        n = len(self.boundary_names)
        if pred.ndim != 3 or pred.shape[1] != n:
            raise ConfigError(
                f"the network returned shape {tuple(pred.shape)}, expected (B, {n}, W) for boundaries "
                f"{self.boundary_names}; make the net's num_boundaries, boundary_names and the data's "
                f"layer_indices agree"
            )
        if "coords" in batch and batch["coords"].shape != pred.shape:
            raise ConfigError(
                f"the network predicts {tuple(pred.shape[1:])} (boundaries, columns) but the batch holds targets "
                f"{tuple(batch['coords'].shape[1:])}; make the net's num_boundaries/output_width and the data's "
                f"layer_indices/output_width agree"
            )

    def row_scale(self, batch: dict[str, Any]) -> Tensor:
        """Original rows per input row, ``(B,)``."""
        return batch["size"][:, 0].to(torch.float32) / batch["image"].shape[-2]

    def order_penalty(self, pred: Tensor) -> Tensor:
        """Mean squared amount (input pixels) by which a boundary lies above the one before it."""
        if pred.shape[1] < 2:
            return pred.new_zeros(())
        return F.relu(pred[:, :-1] - pred[:, 1:]).pow(2).mean()

    def loss(self, pred: Tensor, row_logits: Tensor | None, batch: dict[str, Any]) -> Tensor:
        """The training loss of rows ``pred`` (input pixels) and ``row_logits`` against ``batch``."""
        return boundary_regression_loss(
            pred, batch["coords"].float(), batch["valid"], row_logits, self.loss_kind, self.target_sigma, self.ce_weight
        )

    def constant_loss(self, batch: dict[str, Any]) -> Tensor:
        """The loss of the best constant prediction on ``batch``: what a network that learnt nothing scores.

        Per boundary the mean annotated row of the batch at every column (and, for ``ce_l1``, the
        batch's histogram of that boundary's rows, Gaussian-smoothed as the targets are, as the
        constant row distribution). Used by the learning tests and
        :class:`~octlightning.callbacks.BeatConstantBaseline`.
        """
        coords, valid = batch["coords"].float(), batch["valid"].bool()
        y = torch.where(valid, coords, torch.zeros_like(coords))
        count = valid.sum(dim=(0, 2)).clamp_min(1)
        mean = (y.sum(dim=(0, 2)) / count).view(1, -1, 1).expand_as(coords)
        logits = None
        if self.loss_kind == "ce_l1":
            h = batch["image"].shape[-2]
            rows = torch.arange(h, device=coords.device, dtype=torch.float32).view(1, 1, -1, 1)
            t = torch.softmax(-0.5 * ((rows - y.unsqueeze(2)) / self.target_sigma) ** 2, dim=2) * valid.unsqueeze(2)
            hist = t.sum(dim=(0, 3)) / count.unsqueeze(-1)  # (L, H)
            logits = hist.clamp_min(1e-12).log().view(1, -1, h, 1).expand(*coords.shape[:2], h, coords.shape[-1])
        return self.loss(mean, logits, batch)

    def _step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        pred, row_logits = self.predict_rows(batch["image"])
        self._check(pred, batch)
        loss = self.loss(pred, row_logits, batch)
        if self.order_weight > 0:
            loss = loss + self.order_weight * self.order_penalty(pred)
        return pred, loss

    def _update(self, metrics: BoundaryError, pred: Tensor, batch: dict[str, Any]) -> None:
        metrics.update(pred.detach(), batch["coords"], batch["valid"], self.row_scale(batch), batch["spacing_um"])

    def _log_metrics(self, metrics: BoundaryError, prefix: str) -> dict[str, float]:
        values = metrics.compute()  # synced over DDP ranks by torchmetrics
        metrics.reset()
        flat: dict[str, Tensor] = {}
        for unit in ("px", "um"):
            per = values[f"mae_{unit}"]
            if torch.isfinite(per).any():
                flat[f"{prefix}/mae_{unit}"] = per[torch.isfinite(per)].mean()
            for name, v in zip(self.boundary_names, per, strict=True):
                if torch.isfinite(v):
                    flat[f"{prefix}/mae_{unit}_{name}"] = v
            t = values.get(f"thickness_mae_{unit}")
            if t is not None and torch.isfinite(t):
                flat[f"{prefix}/thickness_mae_{unit}"] = t
        for key, value in flat.items():
            self.log(key, value.float(), prog_bar=key == f"{prefix}/mae_px")
        return {k: float(v) for k, v in flat.items()}

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        _, loss = self._step(batch)
        self.log_training({"train/loss": loss}, batch_size=len(batch["id"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        pred, loss = self._step(batch)
        self.val_loss.update(loss.detach(), weight=len(batch["id"]))
        self._update(self.val_metrics, pred, batch)
        return {"pred": pred.detach()} if batch_idx == 0 else None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pred, _ = self._step(batch)
        self._update(self.test_metrics, pred, batch)
        e = boundary_abs_errors(pred, batch["coords"], batch["valid"], self.row_scale(batch), self.thickness_between)
        n = e["valid"].sum(-1)
        mae = (e["err"].sum(-1) / n).cpu()  # (B, L), NaN where a boundary has no annotated column
        thick = thick_n = None
        if self.thickness_between is not None:
            thick_n = e["thickness_valid"].sum(-1)
            thick = (e["thickness_err"].sum(-1) / thick_n).cpu()
        for i, sample_id in enumerate(batch["id"]):
            row: dict[str, Any] = {"id": sample_id}
            if "subject" in batch:
                row["subject"] = batch["subject"][i]
            px = {
                "mae_px": mae[i].nanmean(),
                **{f"mae_px_{k}": v for k, v in zip(self.boundary_names, mae[i], strict=True)},
            }
            if thick is not None:
                px["thickness_mae_px"] = thick[i]
            row.update({k: float(v) for k, v in px.items()})
            spacing = float(batch["spacing_um"][i])
            if np.isfinite(spacing):
                row.update({k.replace("_px", "_um"): float(v) * spacing for k, v in px.items()})
            row.update({f"columns_{k}": int(c) for k, c in zip(self.boundary_names, n[i], strict=True)})
            if thick_n is not None:
                row["_thickness_columns"] = int(thick_n[i])  # for the per-subject pooling only
            self.add_result_row(row)

    def on_test_epoch_end(self) -> None:
        """Log the split's errors; write ``test_metrics.csv`` (one row per B-scan) and, when the samples
        carry subjects, ``test_subjects.csv`` (one row per subject, pooled over its annotated A-scans:
        :func:`~octlightning.metrics.boundary_errors_by_subject`), the figure papers on Duke DME report."""
        self._log_metrics(self.test_metrics, "test")
        rows = self.gather_result_rows()
        self.write_csv([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], "test_metrics.csv")
        self.write_csv(boundary_errors_by_subject(rows, self.boundary_names), "test_subjects.csv")

    # ----------------------------------------------------------------- prediction
    def sample_mc_dropout(self, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of ``samples`` passes with dropout active (rest in eval mode)."""
        dropouts = _dropouts(self.net)
        if not dropouts:
            raise ConfigError(MC_WITHOUT_DROPOUT)
        for m in dropouts:
            m.train()
        try:
            draws = torch.stack([self(x) for _ in range(samples)])
        finally:
            for m in dropouts:
                m.eval()
        return draws.mean(0), draws.std(0)

    def to_original(self, rows: Tensor, size: Tensor, input_height: int) -> np.ndarray:
        """Rows ``(L, W_out)`` in input pixels -> ``(L, W_orig)`` rows in original pixels, per original column."""
        h, w = (int(v) for v in size)
        out, _ = resample_columns(rows.detach().cpu().double().numpy(), w)
        return rescale_rows(out, input_height, h)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        std = None
        if self.mc_samples > 0:
            pred, std = self.sample_mc_dropout(x, self.mc_samples)
        else:
            pred = self(x)
        self._check(pred, batch)
        out = self.run_dir / "predictions"
        out.mkdir(parents=True, exist_ok=True)
        for i, sample_id in enumerate(batch["id"]):
            spacing = float(batch["spacing_um"][i]) if "spacing_um" in batch else float("nan")
            rows = self.to_original(pred[i], batch["size"][i], x.shape[-2])
            np.save(out / f"{sample_id}_boundaries.npy", rows.astype(np.float32))
            table = {name: rows[k] for k, name in enumerate(self.boundary_names)}
            if self.thickness_between is not None:
                up, low = self.thickness_between
                thick = rows[low] - rows[up]
                np.save(out / f"{sample_id}_thickness.npy", thick.astype(np.float32))
                table["thickness_px"] = thick
                if np.isfinite(spacing):
                    table["thickness_um"] = thick * spacing
            if std is not None:
                # A standard deviation scales with the rows but has no offset: scale only.
                s, _ = resample_columns(std[i].cpu().double().numpy(), rows.shape[1])
                s = s * float(batch["size"][i][0]) / x.shape[-2]
                np.save(out / f"{sample_id}_std.npy", s.astype(np.float32))
                table.update({f"{name}_std": s[k] for k, name in enumerate(self.boundary_names)})
            _write_table(table, out / f"{sample_id}_boundaries.csv")
            save_png(self._overlay(batch, i, pred[i], original=True), out / f"{sample_id}_overlay.png")

    # ----------------------------------------------------------------- overlays
    def _overlay(self, batch: dict[str, Any], i: int, pred: Tensor, original: bool = False) -> np.ndarray:
        """The B-scan with the reference (white, when known) and the predicted boundaries (colours)."""
        image = batch["image"][i]
        h_in = image.shape[-2]
        if original:  # back to the original size, so that the picture matches the written coordinates
            h, w = (int(v) for v in batch["size"][i])
            image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        canvas = to_display(image)

        def rows(t: Tensor) -> np.ndarray:
            return rescale_rows(t.detach().float().cpu().numpy(), h_in, canvas.shape[0])

        if "coords" in batch:
            white = [(255, 255, 255)] * len(self.boundary_names)
            canvas = draw_boundaries(canvas, rows(batch["coords"][i]), batch["valid"][i].cpu().numpy(), white)
        return draw_boundaries(canvas, rows(pred))

    def overlay_images(self, batch: dict[str, Any], outputs: dict[str, Tensor]) -> list[tuple[str, np.ndarray]]:
        """First validation batch as overlays for :class:`~octlightning.callbacks.LogOverlays`."""
        return [(str(sid), self._overlay(batch, i, outputs["pred"][i])) for i, sid in enumerate(batch["id"])]


MC_WITHOUT_DROPOUT = (
    "--model.init_args.mc_samples > 0 needs dropout in the network "
    "(--model.init_args.net.init_args.dropout > 0; the samples mean most for a network trained with it)"
)


def _dropouts(net: nn.Module) -> list[nn.Module]:
    """The network's dropout layers that drop something (``p > 0``): what MC dropout samples."""
    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def _write_table(columns: dict[str, np.ndarray], path: Path) -> None:
    """One CSV row per original image column: its index, then the given values (NaN written empty)."""
    names = list(columns)
    data = np.stack([np.asarray(columns[n], dtype=np.float64) for n in names], axis=1)
    with open(path, "w") as fh:
        fh.write(",".join(["column", *names]) + "\n")
        for j, r in enumerate(data):
            fh.write(",".join([str(j), *(f"{v:.3f}" if np.isfinite(v) else "" for v in r)]) + "\n")
