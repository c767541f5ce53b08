"""A ViT foundation encoder (MIRAGE / RETFound style) from a local checkpoint, with a light decoder.

One module on purpose, though past 400 lines: a preset names both the encoder's shape and the key layout
of its released checkpoints, so the network and the loading of those weights are read together.

The encoder is timm's ``VisionTransformer`` built with ``pretrained=False`` (nothing is downloaded);
its size comes from a preset (``mirage-base``, ``mirage-large``, ``retfound``, ``tiny``) that any
argument overrides. Weights are read with :func:`octlightning.checkpoints.load_state_dict`
(``weights_only=True``) and mapped onto timm's names:

* MIRAGE (MultiMAE) checkpoints name the B-scan patch embedding ``input_adapters.bscan.proj``, its
  fixed 2-D position embedding ``input_adapters.bscan.pos_emb`` ``(1, D, h, w)``, the global token
  ``global_tokens`` and the blocks ``encoder.<i>``; the preset's ``key_map`` renames them. The released
  ``.pth`` files also pickle an ``argparse.Namespace``, which ``weights_only`` loading refuses: re-save
  the ``"model"`` entry of a file you trust as a plain state dict first
  (``torch.save(torch.load(f, weights_only=False)["model"], "mirage_base.pth")``).
* RETFound (MAE) checkpoints use timm's names already (``{"model": ...}`` is unwrapped); the MAE
  decoder keys are reported as unexpected and skipped.

Position embeddings are interpolated when the checkpoint's grid differs from the input size, and a
patch embedding trained on another number of channels is adapted (RGB -> gray sums the channels).
Missing and unexpected keys are reported with a warning; a checkpoint of which no key matches is an
error. Outputs are logits at the input resolution: inputs are resized to the encoder's ``img_size``
and logits back (or, with ``dynamic_img_size``, fed as they are with interpolated position embeddings).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from octlightning.checkpoints import load_state_dict
from octlightning.errors import ConfigError

Preset = Literal["mirage-base", "mirage-large", "retfound", "tiny"]

# MultiMAE / MIRAGE names -> timm names (first matching prefix wins).
MIRAGE_KEY_MAP: dict[str, str] = {
    "input_adapters.bscan.proj.": "patch_embed.proj.",
    "input_adapters.bscan.pos_emb": "pos_embed",
    "global_tokens": "cls_token",
    "encoder.": "blocks.",
}

# MIRAGE: 1 gray channel, patch 32, fine-tuned for segmentation at 1024 x 1024, one global token with
# no position embedding (timm: class token + ``no_embed_class``), no final norm. RETFound: MAE ViT-L/16
# at 224 x 224, RGB, class token with a position embedding, final norm.
PRESETS: dict[str, dict[str, Any]] = {
    "mirage-base": dict(
        img_size=1024, patch_size=32, in_chans=1, embed_dim=768, depth=12, num_heads=12,
        no_embed_class=True, final_norm=False, key_map=MIRAGE_KEY_MAP,
    ),
    "mirage-large": dict(
        img_size=1024, patch_size=32, in_chans=1, embed_dim=1024, depth=24, num_heads=16,
        no_embed_class=True, final_norm=False, key_map=MIRAGE_KEY_MAP,
    ),
    "retfound": dict(
        img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
        no_embed_class=False, final_norm=True, key_map={},
    ),
    "tiny": dict(
        img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2,
        no_embed_class=True, final_norm=False, key_map=MIRAGE_KEY_MAP,
    ),
}  # fmt: skip

# Wrappers around a state dict that carry no meaning for the encoder.
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.")


@dataclass
class LoadReport:
    """What a checkpoint load did: keys loaded, model keys left at their initial values, keys skipped."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)


def _rename(key: str, model_keys: set[str], key_map: dict[str, str]) -> str | None:
    """The encoder key a checkpoint key stands for, trying the key and its wrapper-stripped forms."""
    candidates = [key]
    while any(candidates[-1].startswith(p) for p in _WRAPPER_PREFIXES):
        prefix = next(p for p in _WRAPPER_PREFIXES if candidates[-1].startswith(p))
        candidates.append(candidates[-1][len(prefix) :])
    for cand in candidates:
        for old, new in key_map.items():
            if cand.startswith(old):
                cand = new + cand[len(old) :]
                break
        if cand in model_keys:
            return cand
    return None


def _fit_pos_embed(pos: Tensor, encoder: VisionTransformer) -> Tensor:
    """A checkpoint position embedding resized to the encoder's grid and prefix-token layout."""
    target = encoder.pos_embed
    grid = encoder.patch_embed.grid_size
    if pos.ndim == 4:  # MultiMAE keeps (1, D, h, w); timm wants (1, h*w, D)
        old_grid = pos.shape[-2:]
        pos, n_prefix = pos.flatten(2).transpose(1, 2), 0
    else:
        n_tokens = pos.shape[1]
        n_prefix = next(
            (p for p in (0, 1, encoder.num_prefix_tokens) if math.isqrt(n_tokens - p) ** 2 == n_tokens - p), 0
        )
        side = math.isqrt(n_tokens - n_prefix)
        old_grid = (side, side)
    want_prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
    prefix, spatial = pos[:, :n_prefix], pos[:, n_prefix:]
    if tuple(old_grid) != tuple(grid):
        spatial = resample_abs_pos_embed(spatial, new_size=list(grid), old_size=list(old_grid), num_prefix_tokens=0)
    if want_prefix == 0:
        prefix = prefix[:, :0]
    elif prefix.shape[1] != want_prefix:  # no prefix position in the checkpoint: start from zero
        prefix = torch.zeros(1, want_prefix, pos.shape[-1], dtype=pos.dtype)
    out = torch.cat([prefix, spatial], dim=1)
    if out.shape != target.shape:
        raise ValueError(f"position embedding {tuple(pos.shape)} cannot be fitted to {tuple(target.shape)}")
    return out


def load_encoder_weights(
    encoder: VisionTransformer,
    path: str,
    key: str | None = None,
    key_map: dict[str, str] | None = None,
) -> LoadReport:
    """Load a local checkpoint into a timm ViT, renaming prefixes and fitting shapes; see the module doc.

    Raises :class:`ConfigError` (naming the ``weights`` option) when no checkpoint key matches the
    encoder, or when a matching key has a shape that cannot be fitted (naming the keys and shapes).
    """
    state = load_state_dict(path, key)
    own = encoder.state_dict()
    report = LoadReport()
    mapped: dict[str, Tensor] = {}
    mismatched = []
    for ckpt_key, value in state.items():
        name = _rename(ckpt_key, set(own), key_map or {})
        if name is None:
            report.unexpected.append(ckpt_key)
            continue
        if name == "pos_embed" and value.shape != own[name].shape:
            try:
                value = _fit_pos_embed(value, encoder)
                report.adapted.append(f"{ckpt_key}: position embedding resized to {tuple(own[name].shape)}")
            except (ValueError, RuntimeError):  # another width: reported with the other misfits below
                pass
        elif name == "patch_embed.proj.weight" and value.ndim == 4 and value.shape[1] != own[name].shape[1]:
            value = adapt_input_conv(own[name].shape[1], value)
            report.adapted.append(f"{ckpt_key}: patch embedding adapted to {own[name].shape[1]} input channels")
        if value.shape != own[name].shape:
            mismatched.append(f"{ckpt_key} {tuple(value.shape)} -> {name} {tuple(own[name].shape)}")
            continue
        mapped[name] = value
    if mismatched:
        raise ConfigError(
            f"--model.init_args.net.init_args.weights {path}: {len(mismatched)} checkpoint tensors do not fit the "
            f"encoder (wrong preset or size?): " + "; ".join(mismatched[:5])
        )
    if not mapped:
        raise ConfigError(
            f"--model.init_args.net.init_args.weights {path}: no key of the checkpoint matches the encoder "
            f"(first checkpoint keys: {list(state)[:4]}; "
            f"encoder keys look like {list(own)[:4]}); pick the right preset or give key_map to rename prefixes"
        )
    missing, _ = encoder.load_state_dict(mapped, strict=False)
    report.loaded = sorted(mapped)
    report.missing = sorted(missing)
    said = (
        f"{path}: loaded {len(report.loaded)} tensors; {len(report.missing)} encoder tensors keep their "
        f"initial values {report.missing[:8]}; {len(report.unexpected)} checkpoint tensors skipped "
        f"{report.unexpected[:8]}"
    )
    if report.missing:  # part of the encoder stays random: worth a warning
        warnings.warn(said, stacklevel=3)
    else:  # skipped tensors (a classifier head, a final norm) are usual: said, not warned
        rank_zero_info(f"FoundationSegNet: {said}")
    return report


# --------------------------------------------------------------------------- decoders
def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch tokens ``(B, T, D)`` (row-major, prefix tokens removed) -> feature map ``(B, D, h, w)``."""
    b, t, d = tokens.shape
    h, w = grid
    if t != h * w:
        raise ValueError(f"{t} tokens do not fill a {h}x{w} patch grid")
    return tokens.transpose(1, 2).reshape(b, d, h, w)


class LinearDecoder(nn.Module):
    """Per-patch linear classifier (a linear probe): layer norm + linear on each token, as a map."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        return tokens_to_map(self.head(self.norm(tokens)), grid)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022): 7x7 depth-wise conv, layer norm, MLP x4, layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtDecoder(nn.Module):
    """Upsampling decoder in the manner of MultiMAE's / MIRAGE's ConvNeXt adapter.

    Each token is projected to ``channels * upscale**2`` values and unfolded into an
    ``upscale x upscale`` patch of ``channels`` features (pixel shuffle), refined by ``depth``
    ConvNeXt blocks and classified per pixel; the task-level bilinear resize does the rest.
    """

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 384, upscale: int = 4, depth: int = 4):
        super().__init__()
        self.upscale = upscale
        self.proj = nn.Linear(embed_dim, channels * upscale * upscale)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(channels) for _ in range(depth)])
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        x = F.pixel_shuffle(tokens_to_map(self.proj(tokens), grid), self.upscale)
        return self.head(self.blocks(x))


# --------------------------------------------------------------------------- network
class FoundationSegNet(nn.Module):
    """ViT foundation encoder + light decoder -> ``(B, num_classes, H, W)`` logits at the input size.

    Args:
        preset: encoder size and checkpoint layout (``mirage-base``, ``mirage-large``, ``retfound``,
            ``tiny`` for tests); the arguments below that are ``None`` take the preset's value.
        num_classes: output channels (classes incl. background).
        weights: local checkpoint (``.pth``/``.pt``/``.ckpt``/``.safetensors``) of the encoder;
            ``None`` leaves it randomly initialised (with ``mode="frozen"`` a warning says so: fine when a
            Lightning checkpoint restores the network, useless for training).
        weights_key: sub-dictionary of the checkpoint holding the state dict (default: auto-unwrap).
        key_map: checkpoint key prefix -> timm key prefix (default: the preset's, MIRAGE names).
        in_channels: input channels (``None``: the preset's: 1 for MIRAGE, 3 for RETFound).
        img_size: input size in pixels (``None``: the preset's); a checkpoint's position embeddings are
            resampled to it.
        patch_size: ViT patch size override (``None``: the preset's).
        embed_dim: ViT width override (``None``: the preset's).
        depth: ViT block count override (``None``: the preset's).
        num_heads: attention head count override (``None``: the preset's).
        decoder: ``convnext`` (upsampling ConvNeXt decoder) or ``linear`` (per-patch linear probe).
        decoder_channels: ConvNeXt decoder width.
        decoder_upscale: the decoder's upsampling factor per patch.
        decoder_depth: number of ConvNeXt decoder blocks.
        mode: ``frozen`` (encoder weights fixed, in eval mode, run without gradients) or ``finetune``.
        layer_decay: layer-wise learning-rate decay for ``finetune`` (1.0 = off): block ``i`` of ``L``
            trains at ``lr * layer_decay ** (L + 1 - (i + 1))``, the embeddings at ``layer_decay ** (L + 1)``.
        drop_path_rate: stochastic depth of the encoder (fine-tuning regulariser).
        dynamic_img_size: feed inputs at their own size (multiples of the patch size) with interpolated
            position embeddings, instead of resizing them to ``img_size``.
    """

    def __init__(
        self,
        preset: Preset = "mirage-base",
        num_classes: int = 2,
        weights: str | None = None,
        weights_key: str | None = None,
        key_map: dict[str, str] | None = None,
        img_size: int | None = None,
        patch_size: int | None = None,
        in_channels: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        decoder: Literal["convnext", "linear"] = "convnext",
        decoder_channels: int = 384,
        decoder_upscale: int = 4,
        decoder_depth: int = 4,
        mode: Literal["frozen", "finetune"] = "frozen",
        layer_decay: float = 1.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        if mode not in ("frozen", "finetune"):
            raise ValueError(f"mode must be 'frozen' or 'finetune', got {mode!r}")
        if mode == "frozen" and weights is None:
            # Legitimate when a Lightning checkpoint restores the whole network (test/predict --ckpt_path).
            warnings.warn(
                "mode='frozen' without weights: the encoder stays random unless a checkpoint restores it",
                stacklevel=2,
            )
        if not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        cfg = dict(PRESETS[preset])
        overrides = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_channels,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        )  # fmt: skip
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        preset_key_map = cfg.pop("key_map")
        self.mode = mode
        self.layer_decay = layer_decay
        self.dynamic_img_size = dynamic_img_size
        self.encoder = VisionTransformer(
            num_classes=0,
            global_pool="",
            class_token=True,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=dynamic_img_size,
            **cfg,
        )
        self.img_size = tuple(self.encoder.patch_embed.img_size)
        self.patch_size = tuple(self.encoder.patch_embed.patch_size)
        dim = self.encoder.embed_dim
        if decoder == "convnext":
            self.decoder: nn.Module = ConvNeXtDecoder(
                dim, num_classes, decoder_channels, decoder_upscale, decoder_depth
            )
        elif decoder == "linear":
            self.decoder = LinearDecoder(dim, num_classes)
        else:
            raise ValueError(f"decoder must be 'convnext' or 'linear', got {decoder!r}")
        self.load_report: LoadReport | None = None
        if weights is not None:
            if not Path(weights).is_file():  # the recipe names a file that only the user has
                raise ConfigError(
                    f"weights file not found: {weights} (= {Path(weights).resolve()}); set "
                    f"--model.init_args.net.init_args.weights to your local {preset} encoder weights, or to null "
                    f"with --model.init_args.net.init_args.mode finetune to train the encoder from a random start"
                )
            self.load_report = load_encoder_weights(
                self.encoder, weights, weights_key, preset_key_map if key_map is None else key_map
            )
        if mode == "frozen":
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @property
    def stride(self) -> int:
        """Inputs must be multiples of this: the patch size with ``dynamic_img_size``, else any size."""
        return self.patch_size[0] if self.dynamic_img_size else 1

    def train(self, mode: bool = True) -> FoundationSegNet:
        """Keep a frozen encoder in eval mode (no dropout / stochastic depth) while the decoder trains."""
        super().train(mode)
        if self.mode == "frozen":
            self.encoder.eval()
        return self

    def encode(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens ``(B, T, D)`` of ``x`` (prefix tokens removed) and their grid ``(h, w)``."""
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "finetune"):
            tokens = self.encoder.forward_features(x)
        return tokens[:, self.encoder.num_prefix_tokens :], grid

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        if not self.dynamic_img_size and tuple(size) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)
        tokens, grid = self.encode(x)
        logits = self.decoder(tokens, grid)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ optimisation
    def _layer_id(self, name: str) -> int:
        """0 for the embeddings, ``i + 1`` for block ``i``, ``depth + 1`` for the final norm."""
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.encoder.blocks) + 1

    def _trainable(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in module.named_parameters() if p.requires_grad)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups (read by :meth:`BaseTask.parameter_groups`).

        Frozen: the decoder only. Fine-tuning: encoder layers at ``lr`` scaled by ``layer_decay`` per
        layer from the top. Biases, norms, tokens and position embeddings get no weight decay.
        """
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}

        def add(params: Sequence[tuple[str, nn.Parameter]], scale: float) -> None:
            for name, p in params:
                no_decay = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "reg_token"))
                groups.setdefault((scale, no_decay), []).append(p)

        top = len(self.encoder.blocks) + 1
        for name, p in self._trainable(self.encoder):
            add([(name, p)], self.layer_decay ** (top - self._layer_id(name)))
        add(list(self._trainable(self.decoder)), 1.0)
        out = []
        for (scale, no_decay), params in sorted(groups.items(), key=lambda kv: kv[0]):
            group: dict[str, Any] = {"params": params, "lr": lr * scale}
            if no_decay:
                group["weight_decay"] = 0.0
            out.append(group)
        return out
