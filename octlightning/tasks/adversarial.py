"""Segmentation with an adversarial loss (the RETOUCH recipe of Tennakoon et al. 2018).

A discriminator learns to tell (B-scan, reference mask) pairs from (B-scan, predicted mask) pairs; the
segmenter is trained on its segmentation loss plus ``adversarial_weight`` times the loss of fooling the
discriminator, which pushes predictions towards shapes that look like reference annotations. The two
networks are updated alternately in every training step (Lightning manual optimisation). Validation,
test, prediction and metrics are those of :class:`~octlightning.tasks.segmentation.SegmentationTask`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from octlightning.checkpoints import load_state_dict
from octlightning.errors import ConfigError
from octlightning.tasks.segmentation import SegmentationTask


class AdversarialTask(SegmentationTask):
    """SegmentationTask trained together with a discriminator.

    Args:
        net: the segmenter.
        discriminator: a module called as ``discriminator(image, class_maps)`` returning ``(B,)`` logits
            (e.g. :class:`~octlightning.models.discriminator.PairDiscriminator`); ``class_maps`` has the
            segmenter's output channels.
        adversarial_weight: weight of the adversarial term in the segmenter's loss.
        discriminator_lr: learning rate of the discriminator (default: ``lr``); it uses the same
            optimiser type and weight decay as the segmenter, without a schedule.
        segmentation_checkpoint: weights to start the segmenter from (a SegmentationTask ``.ckpt`` or a
            plain state dict of the network), loaded with ``weights_only`` when ``fit`` starts; a
            resumed run's own checkpoint takes precedence.
        **kwargs: everything else of :class:`~octlightning.tasks.segmentation.SegmentationTask`
            (``num_classes``, ``loss``, ``class_names``, ``lr``, ``weight_decay``, ``sliding_window``, ...).

    Checkpoints hold both networks (``net.*`` and ``discriminator.*``) and both optimiser states.
    """

    def __init__(
        self,
        net: nn.Module,
        discriminator: nn.Module,
        adversarial_weight: float = 0.1,
        discriminator_lr: float | None = None,
        segmentation_checkpoint: str | None = None,
        **kwargs: Any,
    ) -> None:
        with warnings.catch_warnings():
            # SegmentationTask's save_hyperparameters sees `discriminator` too; it is dropped right below.
            warnings.filterwarnings("ignore", message="Attribute 'discriminator' is an instance of `nn.Module`")
            super().__init__(net, **kwargs)
        self.save_hyperparameters(
            ignore=["net", "discriminator"] + (["loss"] if isinstance(kwargs.get("loss"), nn.Module) else [])
        )
        self.discriminator = discriminator
        self.adversarial_weight = adversarial_weight
        self.discriminator_lr = discriminator_lr
        self.segmentation_checkpoint = segmentation_checkpoint
        self.automatic_optimization = False

    def networks(self) -> list[nn.Module]:
        return [self.net, self.discriminator]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.segmentation_checkpoint:
            self.load_segmenter(self.segmentation_checkpoint)

    def load_segmenter(self, path: str) -> None:
        """Load segmenter weights from a SegmentationTask checkpoint or a plain network state dict."""
        state = load_state_dict(path, option="--model.init_args.segmentation_checkpoint")
        if any(k.startswith("net.") for k in state):
            state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"--model.init_args.segmentation_checkpoint {path}: does not fit the segmenter "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )

    # ----------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[Any]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def configure_optimizers(self):
        segmenter = super().configure_optimizers()
        if not isinstance(segmenter, dict):
            segmenter = {"optimizer": segmenter}
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        disc = self.build_optimizer([{"params": params, "lr": self.discriminator_lr or self.lr}])
        return [segmenter, {"optimizer": disc}]

    def reference_maps(self, mask: Tensor, channels: int) -> Tensor:
        """``(B, K, H, W)`` one-hot reference (the mask itself for a single sigmoid channel)."""
        target = mask[:, 0].long()
        if channels == 1:
            return target.unsqueeze(1).float()
        return F.one_hot(target.clamp(0, channels - 1), channels).permute(0, 3, 1, 2).float()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        opt_seg, opt_disc = self.optimizers()
        image = self.prepare_input(batch["image"])
        valid = self.valid_mask(batch)
        logits = self.run_net(image)
        seg_loss = self.loss_fn(logits, batch["mask"], valid)
        # Pixels outside the valid area look the same (zero) in both kinds of pairs.
        inside = valid.unsqueeze(1).float()
        fake = self.probabilities(logits) * inside
        real = self.reference_maps(batch["mask"], fake.shape[1]) * inside
        n = image.shape[0]
        ones, zeros = torch.ones(n, device=image.device), torch.zeros(n, device=image.device)

        # 1) discriminator: reference pairs -> 1, predicted pairs -> 0
        self.toggle_optimizer(opt_disc)
        d_real = self.discriminator(image, real).float()
        d_fake = self.discriminator(image, fake.detach()).float()
        d_loss = 0.5 * (
            F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        )
        opt_disc.zero_grad()
        self.manual_backward(d_loss)
        opt_disc.step()
        self.untoggle_optimizer(opt_disc)

        # 2) segmenter: segmentation loss + fool the (now fixed) discriminator
        self.toggle_optimizer(opt_seg)
        adv_loss = F.binary_cross_entropy_with_logits(self.discriminator(image, fake).float(), ones)
        loss = seg_loss + self.adversarial_weight * adv_loss
        opt_seg.zero_grad()
        self.manual_backward(loss)
        opt_seg.step()
        self.untoggle_optimizer(opt_seg)
        self._step_schedulers()

        d_acc = 0.5 * ((d_real > 0).float().mean() + (d_fake <= 0).float().mean())
        logs = {
            "train/loss": loss,
            "train/seg_loss": seg_loss,
            "train/adv_loss": adv_loss,
            "train/disc_loss": d_loss,
            "train/disc_acc": d_acc,
        }
        self.log_training(logs, batch_size=n)
        return loss.detach()

    def _step_schedulers(self) -> None:
        """Manual optimisation steps no scheduler by itself: per-step schedules advance here."""
        scheduler = self.lr_schedulers()
        if scheduler is None or isinstance(scheduler, list):
            return
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and not self.trainer.sanity_checking:
            value = self.trainer.callback_metrics.get(self.monitor)
            if value is not None:
                scheduler.step(value)
