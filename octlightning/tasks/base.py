"""Training machinery every octlightning task shares.

Optimiser and LR schedule from plain config keys (``model.init_args.lr`` sweeps cleanly), the GPU
fast path (channels_last, fused AdamW, optional ``torch.compile`` with a clean fallback), the run
folder, and per-sample result tables gathered across DDP ranks.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from octlightning.errors import ConfigError


class BaseTask(L.LightningModule):
    """Base LightningModule: the network, the optimisation, the validation loss, the GPU fast path.

    Subclasses give every argument below in their own signature, with the defaults of their recipe
    (what ``--help`` and ``--print_config`` show; this class has none, so each default is typed once),
    create ``val_metrics`` and implement the steps and :meth:`_log_metrics`.

    Args:
        net: the network (``self.net``).
        monitor: validation metric for checkpoints, early stopping and the ``plateau`` schedule.
        monitor_mode: ``max`` or ``min``: whether a larger ``monitor`` is better.
        lr: peak learning rate.
        weight_decay: L2 / decoupled weight decay.
        optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9); fused kernels on CUDA.
        scheduler: ``none``, ``cosine`` (per step, after ``warmup_epochs`` linear warm-up),
            ``plateau`` (halve on a stalled monitored metric) or ``step`` (x0.1 every third of training).
            ``cosine`` and ``step`` span ``max_epochs`` (or ``max_steps``), or with ``max_epochs: -1`` the
            trainer's ``max_time`` (a time budget; see :meth:`schedule_span`).
        warmup_epochs: linear warm-up length for ``cosine``.
        channels_last: NHWC memory format for the network and its inputs when training on a GPU (what
            tensor cores want); leave it off for transformers, where it gains nothing. Not applied on the
            CPU, where it made our conv nets slower (U-Net 9 %, DeepLabV3+ 16 %, torch 2.14, 2 cores).
        compile: ``torch.compile`` the network; falls back to eager with a warning if compilation fails.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        monitor: str,
        monitor_mode: Literal["min", "max"],
        lr: float,
        weight_decay: float,
        optimizer: Literal["adam", "adamw", "sgd"],
        scheduler: Literal["none", "cosine", "plateau", "step"],
        warmup_epochs: int,
        channels_last: bool,
        compile: bool,
    ) -> None:
        super().__init__()
        self.net = net
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.scheduler_name = scheduler
        self.warmup_epochs = warmup_epochs
        self.channels_last = channels_last
        self.compile = compile
        self._channels_last = False  # decided in setup, once the device is known
        self._forward_impl: Callable[[Tensor], Any] | None = None
        # Per-sample rows of the running stage, before gathering; callbacks may add columns to them.
        self.result_rows: list[dict[str, Any]] = []
        self.val_loss = torchmetrics.MeanMetric()  # per-batch losses weighted by batch size

    # ----------------------------------------------------------------- fast path
    def networks(self) -> list[nn.Module]:
        """The networks that channels_last/compile apply to (override for several)."""
        return [self.net]

    def target_device(self) -> torch.device:
        """Where the trainer will run this module (``setup`` runs before the move to the device)."""
        trainer = getattr(self, "_trainer", None)
        return trainer.strategy.root_device if trainer is not None else self.device

    def setup(self, stage: str) -> None:
        self._channels_last = self.channels_last and self.target_device().type == "cuda"
        if self._channels_last:
            for net in self.networks():
                net.to(memory_format=torch.channels_last)
        if self.compile and self._forward_impl is None:
            # Compile the bound forward, not the module: a compiled module would register itself as a
            # submodule and prefix every state-dict key with `_orig_mod.`.
            self._forward_impl = torch.compile(self.net.forward)

    def prepare_input(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def run_net(self, x: Tensor) -> Any:
        """Forward through the (possibly compiled) network, falling back to eager when compile fails."""
        x = self.prepare_input(x)
        if self._forward_impl is not None:
            try:
                return self._forward_impl(x)
            except Exception as err:  # compilation errors surface at a call (first use, a new shape)
                warnings.warn(
                    f"torch.compile failed for {type(self.net).__name__}, running eagerly instead: "
                    f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                    stacklevel=2,
                )
                self._forward_impl = None
        return self.net(x)

    # ----------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]] | Any:
        """Parameters to optimise (override for layer-wise learning rates).

        A network that defines ``param_groups(lr)`` (e.g. layer-wise LR decay of a fine-tuned encoder,
        :class:`~octlightning.models.foundation.FoundationSegNet`) chooses its own groups, whatever the
        task; trainable task parameters outside the network join at the base rate.
        """
        net = getattr(self, "net", None)
        if callable(getattr(net, "param_groups", None)):
            groups = [g for g in net.param_groups(self.lr) if g["params"]]
            in_net = {id(p) for p in net.parameters()}
            rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_net]
            return groups + ([{"params": rest}] if rest else [])
        return [p for p in self.parameters() if p.requires_grad]

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, **fused)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, **fused)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}; choose adam, adamw or sgd")

    def configure_optimizers(self):
        opt = self.build_optimizer(self.parameter_groups())
        if self.scheduler_name == "none":
            return opt
        if self.scheduler_name == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=self.monitor_mode, factor=0.5, patience=5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor}}
        if self.scheduler_name not in ("step", "cosine"):
            raise ValueError(f"unknown scheduler {self.scheduler_name!r}; choose none, cosine, plateau or step")
        warmup, span = self.schedule_span()
        if self.scheduler_name == "step":

            def factor(step: int) -> float:
                return 0.1 ** min(2, int(3 * span(step)))  # x0.1 after each third

        else:

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                return 0.5 * (1 + math.cos(math.pi * span(step)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def schedule_span(self) -> tuple[int, Callable[[int], float]]:
        """``(warm-up steps, span)``: ``span(step)`` is how far through training (after the warm-up) an
        optimiser step is, in [0, 1], what the ``cosine`` and ``step`` schedules follow.

        The training length is the trainer's ``max_steps``/``max_epochs``. A run given neither
        (``max_epochs: -1``) but ``max_time`` is a time budget: the span is the share of ``max_time`` the
        trainer's Timer has counted (resumed runs included), so the learning rate has decayed when the
        budget ends, on a fast machine or a slow one; such a run is not step-for-step reproducible. The
        warm-up (``cosine``: ``warmup_epochs`` of steps) counts steps in both cases.

        Raises:
            ConfigError: no training length is set (``max_epochs: -1`` without ``max_steps`` or ``max_time``).
        """
        total = float(self.trainer.estimated_stepping_batches)  # loads the training batches, unless max_epochs is -1
        if not math.isfinite(self.trainer.num_training_batches):
            self.trainer.fit_loop.setup_data()  # as estimated_stepping_batches does; needed for the warm-up
        steps_per_epoch = max(1, int(self.trainer.num_training_batches) // self.trainer.accumulate_grad_batches)
        warmup = self.warmup_epochs * steps_per_epoch if self.scheduler_name == "cosine" else 0
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if math.isfinite(total):
            warmup = min(warmup, max(0, int(total) - 1))
            length = max(1.0, total - warmup)
            if timer is not None and timer.time_remaining() is not None:
                rank_zero_warn(
                    f"the {self.scheduler_name} learning-rate schedule spans {int(total)} steps (trainer.max_epochs "
                    f"or max_steps): if max_time ends the run first, its learning rate has not decayed; "
                    f"--trainer.max_epochs -1 (without max_steps) makes the schedule span max_time"
                )
            return warmup, lambda step: min(1.0, max(0, step - warmup) / length)
        if timer is None or timer.time_remaining() is None:
            raise ConfigError(
                f"--model.init_args.scheduler {self.scheduler_name} needs a training length: --trainer.max_epochs, "
                f"--trainer.max_steps or --trainer.max_time"
            )
        budget = timer.time_elapsed() + timer.time_remaining()
        return warmup, lambda step: min(1.0, timer.time_elapsed() / budget) if step >= warmup else 0.0

    # ----------------------------------------------------------------- logging
    def log_training(self, values: dict[str, Tensor], batch_size: int, prog_bar: str = "train/loss") -> None:
        """Log training values as ``<key>_step`` (this rank's value) and ``<key>_epoch`` (mean over ranks).

        One ``self.log(..., on_step=True, sync_dist=True)`` would all-reduce every value at every step
        under DDP, a collective call and a wait per step; the step curve does not need it, so only the
        epoch means are reduced across ranks, once, when the epoch ends.
        """
        for key, value in values.items():
            value = value.detach()
            shown = key == prog_bar
            self.log(f"{key}_step", value, on_step=True, on_epoch=False, prog_bar=shown, batch_size=batch_size)
            self.log(f"{key}_epoch", value, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def _log_metrics(self, metrics: Any, prefix: str) -> dict[str, float]:
        """Compute, log as ``<prefix>/<name>`` and reset the epoch ``metrics``; return what was logged."""
        raise NotImplementedError

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        self._log_metrics(self.val_metrics, "val")

    # ----------------------------------------------------------------- run folder
    @property
    def run_dir(self) -> Path:
        """The run folder (``runs/<experiment>/<version>/``), where tables and images go.

        The CLI makes it the trainer's ``default_root_dir``, identical on every DDP rank; reading it
        needs no collective call (``trainer.log_dir`` broadcasts, which hangs when only rank 0 asks).
        """
        return Path(self.trainer.default_root_dir)

    def add_result_row(self, row: dict[str, Any]) -> None:
        """Collect one per-sample result (test metrics, predictions) for :meth:`gather_result_rows`."""
        self.result_rows.append(row)

    def gather_result_rows(self, key: str = "id") -> list[dict[str, Any]]:
        """Rows from every DDP rank, duplicates by ``key`` dropped, sorted; empty on ranks other than 0."""
        rows = self.result_rows
        self.result_rows = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[dict]] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero:
            return []
        unique = {r[key]: r for r in rows}
        return [unique[k] for k in sorted(unique)]

    def write_csv(self, rows: list[dict[str, Any]], filename: str) -> Path | None:
        """Write rows (columns in first-seen order) to a CSV in the run folder."""
        if not rows:
            return None
        fields = list(dict.fromkeys(f for r in rows for f in r))
        path = self.run_dir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return path
