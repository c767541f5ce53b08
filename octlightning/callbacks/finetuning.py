"""Transfer learning: the pretrained encoder frozen for the first epochs, then fine-tuned at a lower LR."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from octlightning.errors import ConfigError


class FreezeBackbone(BaseFinetuning):
    """Train with the pretrained encoder frozen for the first epochs, then fine-tune it at a lower LR.

    The transfer-learning recipe: the randomly initialised decoder first learns on fixed pretrained
    features, so its large early gradients cannot wreck them; from ``unfreeze_at_epoch`` on the
    encoder trains too, at ``lr_factor`` times the learning rate of the rest (its own parameter
    group; LR schedulers are told about it). Built on Lightning's
    :class:`~lightning.pytorch.callbacks.BaseFinetuning`, which keeps the group across resumes; unlike
    ``BackboneFinetuning`` the module is named by a path, so any task and network exposing its
    encoder works.

    How the encoder is held fixed (``freeze_by``):

    - ``requires_grad``: its parameters stop requiring gradients and join the optimiser when
      unfrozen; no backward pass runs through the frozen encoder (faster).
    - ``gradients``: its parameters keep ``requires_grad``, sit in their own optimiser group from the
      start, and their gradients are dropped before every optimiser step while frozen. DDP only
      synchronises parameters that require gradients when the model is wrapped, so unfreezing by
      ``requires_grad`` there would leave ranks training different encoders (Lightning issue #20340).
    - ``auto`` (default): ``gradients`` when training on several processes, else ``requires_grad``.

    Freezing a *randomly initialised* encoder only wastes epochs (its random features are what the
    decoder would learn on), so the callback does nothing when the network says its encoder was not
    loaded from weights: a module on the ``backbone`` path (the task's ``net``, say) with a boolean
    ``pretrained_encoder`` attribute (:class:`~octlightning.models.smp_net.SMPNet`, the
    layer-regression nets) decides; ``only_if_pretrained=False`` freezes regardless. Networks without
    the attribute are frozen as configured.

    In a config: ``"trainer": {"callbacks": [{"class_path": "octlightning.callbacks.FreezeBackbone",
    "init_args": {"unfreeze_at_epoch": 5, "lr_factor": 0.1}}]}``.

    Args:
        unfreeze_at_epoch: first (0-based) epoch in which the encoder trains; 0 never freezes it.
        lr_factor: the encoder's learning rate relative to the first parameter group's.
        backbone: attribute path from the LightningModule to the encoder (``net.encoder`` is
            :attr:`octlightning.models.smp_net.SMPNet.encoder`).
        train_bn: keep the frozen encoder's BatchNorm layers training (Lightning's default); their
            parameters then stay in the first group throughout.
        freeze_by: ``auto``, ``requires_grad`` or ``gradients`` (see above).
        only_if_pretrained: skip freezing when the network reports a randomly initialised encoder.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int = 5,
        lr_factor: float = 0.1,
        backbone: str = "net.encoder",
        train_bn: bool = True,
        freeze_by: Literal["auto", "requires_grad", "gradients"] = "auto",
        only_if_pretrained: bool = True,
    ) -> None:
        super().__init__()
        if unfreeze_at_epoch < 0 or lr_factor <= 0:
            raise ConfigError(
                f"FreezeBackbone (trainer.callbacks) needs unfreeze_at_epoch >= 0 and lr_factor > 0, "
                f"got {unfreeze_at_epoch} and {lr_factor}"
            )
        if freeze_by not in ("auto", "requires_grad", "gradients"):
            raise ValueError(f"freeze_by must be auto, requires_grad or gradients, not {freeze_by!r}")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.lr_factor = lr_factor
        self.backbone = backbone
        self.train_bn = train_bn
        self.freeze_by = freeze_by
        self.only_if_pretrained = only_if_pretrained
        self._by_gradients = freeze_by == "gradients"

    def encoder_is_pretrained(self, pl_module: L.LightningModule) -> bool | None:
        """What the first module on the ``backbone`` path with a ``pretrained_encoder`` flag says (or None)."""
        module: Any = pl_module
        for name in self.backbone.split("."):
            flag = getattr(module, "pretrained_encoder", None)
            if isinstance(flag, bool):
                return flag
            module = getattr(module, name, None)
            if module is None:
                return None
        flag = getattr(module, "pretrained_encoder", None)
        return flag if isinstance(flag, bool) else None

    def backbone_module(self, pl_module: L.LightningModule) -> nn.Module:
        module = pl_module
        for name in self.backbone.split("."):
            module = getattr(module, name, None)
            if module is None:
                raise AttributeError(
                    f"FreezeBackbone: {type(pl_module).__name__} has no module at {self.backbone!r} "
                    f"(set init_args.backbone to the encoder's attribute path)"
                )
        if not isinstance(module, nn.Module):
            raise TypeError(f"FreezeBackbone: {self.backbone!r} is a {type(module).__name__}, not an nn.Module")
        return module

    def _encoder_params(self, pl_module: L.LightningModule) -> list[nn.Parameter]:
        """The parameters that are frozen: all of the encoder's, BatchNorm's excepted with ``train_bn``."""
        return list(self.filter_params(self.backbone_module(pl_module), train_bn=self.train_bn, requires_grad=True))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # nothing trains: nothing to freeze, and nothing to say (test/predict printed it)
            return
        if self.only_if_pretrained and self.unfreeze_at_epoch > 0 and self.encoder_is_pretrained(pl_module) is False:
            rank_zero_info(
                f"FreezeBackbone: {self.backbone} was not loaded from pretrained weights; it trains from the "
                f"first epoch at the full learning rate (freezing random features teaches nothing)"
            )
            self.unfreeze_at_epoch = 0
            self.lr_factor = 1.0
        elif self.unfreeze_at_epoch > 0:
            rank_zero_info(
                f"FreezeBackbone: {self.backbone} frozen for epochs 0-{self.unfreeze_at_epoch - 1}, then trained at "
                f"{self.lr_factor:g} x the learning rate of the rest"
            )
        if self.freeze_by == "auto":
            self._by_gradients = trainer.world_size > 1
        elif self.freeze_by == "requires_grad" and trainer.world_size > 1:
            rank_zero_warn("FreezeBackbone(freeze_by='requires_grad') under DDP: ranks' encoders will diverge")
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.unfreeze_at_epoch > 0 and not self._by_gradients:
            self.freeze(self.backbone_module(pl_module), train_bn=self.train_bn)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restarting = self._restarting
        super().on_fit_start(trainer, pl_module)  # a resumed run gets its stored groups back here
        if restarting:
            # The schedulers were built by configure_optimizers for the groups of a fresh run; the
            # encoder's group restored above needs its entry too before their state is loaded.
            for optimizer in trainer.optimizers:
                self._extend_schedulers(trainer, optimizer)
            return
        if not self._by_gradients or self.unfreeze_at_epoch == 0:
            return
        # Move the encoder's parameters out of the group(s) the task built into one of their own.
        encoder = {id(p) for p in self._encoder_params(pl_module)}
        optimizer = trainer.optimizers[0]
        moved = [p for g in optimizer.param_groups for p in g["params"] if id(p) in encoder]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in encoder]
        if moved:
            optimizer.add_param_group({"params": moved, "lr": optimizer.param_groups[0]["lr"] * self.lr_factor})
            self._extend_schedulers(trainer, optimizer)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        # Gradients were already averaged across ranks: dropping them everywhere keeps ranks equal,
        # and optimisers skip parameters without a gradient (no update, no moments, no weight decay).
        if self._by_gradients and trainer.current_epoch < self.unfreeze_at_epoch:
            for p in self._encoder_params(pl_module):
                p.grad = None

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        # ">=" rather than "==": a run resumed after the unfreeze epoch starts with a frozen encoder too.
        if self._by_gradients or epoch < self.unfreeze_at_epoch:
            return
        module = self.backbone_module(pl_module)
        frozen = [p for p in module.parameters() if not p.requires_grad]
        if not frozen:
            return
        self.make_trainable(module)
        rank_zero_info(
            f"FreezeBackbone: epoch {epoch}: {self.backbone} unfrozen, at {self.lr_factor:g} x the learning rate"
        )
        # By identity: Lightning's filter_on_optimizer compares values, and two freshly initialised
        # BatchNorm weights (all ones) would wrongly count as the same parameter.
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [p for p in frozen if id(p) not in present]
        if not new:  # a resumed run: Lightning already restored the encoder's parameter group
            return
        optimizer.add_param_group({"params": new, "lr": optimizer.param_groups[0]["lr"] * self.lr_factor})
        self._extend_schedulers(pl_module.trainer, optimizer)

    def _extend_schedulers(self, trainer: L.Trainer, optimizer: Optimizer) -> None:
        """Give the optimiser's LR schedulers an entry for each group they lack (LambdaLR etc. fail without).

        A group added here runs at ``lr_factor`` times the first group's base rate, on the first group's
        schedule; a resumed run then loads the stored values over these.
        """
        n = len(optimizer.param_groups)
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if getattr(sched, "optimizer", None) is not optimizer:
                continue
            base_lrs = getattr(sched, "base_lrs", None)
            while isinstance(base_lrs, list) and 0 < len(base_lrs) < n:
                optimizer.param_groups[len(base_lrs)].setdefault("initial_lr", base_lrs[0] * self.lr_factor)
                base_lrs.append(base_lrs[0] * self.lr_factor)
            for name in ("lr_lambdas", "min_lrs"):
                values = getattr(sched, name, None)
                while isinstance(values, list) and 0 < len(values) < n:
                    values.append(values[0])
            last = getattr(sched, "_last_lr", None)
            while isinstance(last, list) and 0 < len(last) < n:
                last.append(optimizer.param_groups[len(last)]["lr"])
