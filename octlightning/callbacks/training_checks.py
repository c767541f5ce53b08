"""Callbacks that watch whether training works: early stopping after the warm-up (warning when the first
epoch stays the best), and a warning when the loss never beats that of a constant prediction."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class WarmupEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` that starts counting patience after the learning-rate warm-up and
    says when the best epoch was the first one.

    During the first ``warmup_epochs`` epochs (``None``: the task's ``warmup_epochs``, 0 without one)
    the best value is tracked but stalled validations are not counted, so a run cannot stop while its
    learning rate is still rising. When training ends and the best monitored value is still the one of
    the first validation, a warning says so: the checkpoint kept is an untrained network, which
    otherwise passes unnoticed (a network stuck at a constant prediction "improves" only once).

    Args:
        monitor: the logged metric, as for ``EarlyStopping``.
        mode: ``min``/``max``; ``None`` takes the task's ``monitor_mode`` (``min`` without one).
        warmup_epochs: epochs before patience counts.
        **kwargs: further :class:`~lightning.pytorch.callbacks.EarlyStopping` arguments (``patience``:
            validations without improvement before stopping, ``min_delta``, ...), with its defaults.
    """

    def __init__(self, monitor: str, *, mode: str | None = None, warmup_epochs: int | None = None, **kwargs: Any):
        super().__init__(monitor=monitor, mode=mode or "min", **kwargs)
        self._mode_from_task = mode is None
        self.warmup_epochs = warmup_epochs
        self.best_epoch: int | None = None
        self.first_epoch: int | None = None
        self.validations = 0  # monitored validations seen (a single one has nothing to compare)
        self._epoch = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        mode = getattr(pl_module, "monitor_mode", "min")
        if self._mode_from_task and mode != self.mode:
            if mode not in self.mode_dict:
                raise ValueError(f"WarmupEarlyStopping: the task's monitor_mode {mode!r} is neither min nor max")
            # What EarlyStopping.__init__ derives from the mode (checkpoint restore comes after setup).
            self.mode = mode
            self.min_delta = abs(self.min_delta) * (1 if self.monitor_op == torch.gt else -1)
            self.best_score = torch.tensor(torch.inf if self.monitor_op == torch.lt else -torch.inf)
        if self.warmup_epochs is None:
            self.warmup_epochs = int(getattr(pl_module, "warmup_epochs", 0) or 0)

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        self._epoch = trainer.current_epoch
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        before = self.best_score.clone()
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if self.first_epoch is None:
            self.first_epoch = self._epoch
        self.validations += 1
        if not torch.equal(before.to(self.best_score.device), self.best_score):
            self.best_epoch = self._epoch
        if self._epoch < (self.warmup_epochs or 0) and torch.isfinite(current):
            self.wait_count = 0  # warm-up: record the best, count nothing
            return False, reason
        return should_stop, reason

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or self.best_epoch is None or self.validations < 2:
            return
        if self.best_epoch == self.first_epoch:
            rank_zero_warn(
                f"WarmupEarlyStopping: the best {self.monitor} ({float(self.best_score):.4g}) is the one of the first "
                f"validated epoch ({self.best_epoch}); nothing later improved on it, so the kept checkpoint is "
                f"an (almost) untrained network. Check the learning rate, the loss and the data."
            )

    def state_dict(self) -> dict[str, Any]:
        extra = {"best_epoch": self.best_epoch, "first_epoch": self.first_epoch, "validations": self.validations}
        return {**super().state_dict(), **extra}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.best_epoch = state.pop("best_epoch", None)
        self.first_epoch = state.pop("first_epoch", None)
        self.validations = state.pop("validations", 0)
        super().load_state_dict(state)


def constant_prediction_loss(pl_module: L.LightningModule, batch: dict[str, Any]) -> Tensor | None:
    """The task's loss on ``batch`` for the best constant prediction, or None when it cannot be formed.

    Tasks may define ``constant_loss(batch)`` (layer regression: each boundary's mean row). A task with
    a ``loss_fn(logits, mask, valid)`` and batches with ``mask`` (segmentation) gets constant logits from
    the batch's class frequencies (over valid pixels): ``log p`` per class, or the logit of the
    foreground fraction for a binary (one-channel) task.
    """
    own = getattr(pl_module, "constant_loss", None)
    if callable(own):
        return own(batch)
    loss_fn = getattr(pl_module, "loss_fn", None)
    if loss_fn is None or "mask" not in batch or "image" not in batch:
        return None
    mask = batch["mask"]
    mask = mask[:, 0] if mask.dim() == 4 else mask
    valid_mask = getattr(pl_module, "valid_mask", None)
    valid = valid_mask(batch) if callable(valid_mask) else None
    v = torch.ones_like(mask, dtype=torch.bool) if valid is None else (valid[:, 0] if valid.dim() == 4 else valid)
    v = v.bool()
    b, (h, w) = mask.shape[0], mask.shape[-2:]
    if getattr(pl_module, "binary", False):
        p = (mask.float() * v).sum() / v.sum().clamp_min(1)
        p = p.clamp(1e-4, 1 - 1e-4)
        logits = torch.log(p / (1 - p)).view(1, 1, 1, 1).expand(b, 1, h, w)
    else:
        k = int(pl_module.num_classes)
        counts = torch.bincount(mask[v].long().clamp(0, k - 1), minlength=k).float()
        freq = (counts / counts.sum().clamp_min(1)).clamp_min(1e-6)
        logits = freq.log().view(1, k, 1, 1).expand(b, k, h, w)
    return loss_fn(logits.to(mask.device), batch["mask"], valid)


class BeatConstantBaseline(L.Callback):
    """Warn when a run's training loss never beats that of a constant prediction.

    A network that learns nothing converges to the best constant output (the mean row of each boundary,
    the class frequencies), and its loss then looks like a plateau rather than a failure. Each training
    batch's loss is compared with :func:`constant_prediction_loss` on the same (augmented) batch;
    epoch means are summed over DDP ranks. Once ``check_after_epochs`` epochs and ``check_after_steps``
    optimiser steps are done (checked at every later epoch end), if no epoch's mean training loss was
    below ``margin`` times the constant prediction's, a warning says so, once. Both limits matter: a
    small dataset has few steps per epoch (the Duke DME recipe: 8), and a network trained from scratch
    starts above the constant (it beat it after 47 steps there). The CLI adds this check to every
    ``fit``. Costs one loss evaluation per batch and no network pass; the sums stay on the device (no
    synchronisation per step).

    Args:
        check_after_epochs: epochs given to the network before the first warning.
        check_after_steps: optimiser steps given to the network before the first warning.
        margin: the fraction of the constant loss an epoch must get below to count as learning.
    """

    def __init__(self, check_after_epochs: int = 3, check_after_steps: int = 100, margin: float = 0.9) -> None:
        self.check_after_epochs = check_after_epochs
        self.check_after_steps = check_after_steps
        self.margin = margin
        self.beaten = False
        self.warned = False
        self.epochs: list[tuple[float, float]] = []  # (mean training loss, mean constant loss) per epoch
        self._sums: Tensor | None = None  # (loss, constant loss, batches) of this epoch, on the device

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums = torch.zeros(3, dtype=torch.float32, device=pl_module.device)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not isinstance(batch, dict) or self._sums is None:
            return
        constant = constant_prediction_loss(pl_module, batch)
        if constant is None:
            return
        self._sums += torch.stack([loss.detach().float(), constant.detach().float(), self._sums.new_ones(())])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sums is None:
            return
        sums = trainer.strategy.reduce(self._sums, reduce_op="sum")
        if float(sums[2]) == 0:
            return
        train, constant = float(sums[0] / sums[2]), float(sums[1] / sums[2])
        self.epochs.append((train, constant))
        self.beaten = self.beaten or train < self.margin * constant
        if len(self.epochs) >= self.check_after_epochs and trainer.global_step >= self.check_after_steps:
            self._maybe_warn(trainer.global_step)

    def _maybe_warn(self, steps: int) -> None:
        if self.beaten or self.warned:
            return
        self.warned = True
        train, constant = self.epochs[-1]
        rank_zero_warn(
            f"BeatConstantBaseline: after {len(self.epochs)} epoch(s), {steps} steps, the training loss ({train:.4g}) "
            f"has never been below {self.margin:g} x that of the best constant prediction ({constant:.4g}): the "
            f"network is not learning. Check the learning rate, the head/loss and the data."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"beaten": self.beaten, "warned": self.warned, "epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.beaten = bool(state_dict.get("beaten", False))
        self.warned = bool(state_dict.get("warned", False))
        self.epochs = [tuple(e) for e in state_dict.get("epochs", [])]
