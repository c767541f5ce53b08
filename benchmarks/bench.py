"""Training throughput: a plain PyTorch loop against ``octlightning fit``, in one process, same device.

For each recipe, with the network and batch size of its hparams file:

    (a) plain loop, fp32, random tensors already on the device (what the published scripts run),
    (b) the same loop at its best: bf16 autocast + channels_last + torch.compile (GPU only),
    (c) ``octlightning fit`` with the recipe's hparams and its DataModule reading the real files.

(a) is measured before and after (c) and averaged, so that a drifting machine biases the ratios less.
(c) runs as a user's fit does (loggers, checkpoints, loader workers), without validation. Printed as a
markdown table with c/a and c/b, on the CPU also (c)'s steps alone (data waits excluded), peak GPU
memory beside each; then the loader-only throughput of each DataModule (its training dataloader with
augmentation, no model, after one warm-up epoch) against (c), and the per-epoch overhead of the
vessel recipe (wall time of N epochs on DRIVE against the sum of its steps).

    python benchmarks/bench.py                 # GPU: every recipe whose data is present
    python benchmarks/bench.py --cpu           # 2-core CPU: small networks, fp32 (a) vs (c)

Run by hand or by ``make bench`` / ``make bench-cpu`` / ``make bench-device`` (the lent GPU machine);
never in CI (timings need a quiet machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from octlightning.cli import OctLightningCLI
from octlightning.losses import masked_regression_loss

REPO = Path(__file__).resolve().parents[1]
# Where the recipes' `../shared/data/...` roots point; `--shared-data` moves it (the lent GPU machine
# gets the data in a carried folder, since ../shared does not travel there).
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclass
class Recipe:
    name: str
    config: str
    # Overrides for the GPU run (the published sizes) and for the CPU run (small and quick).
    gpu_args: list[str] = field(default_factory=list)
    cpu_args: list[str] = field(default_factory=list)


# No released MIRAGE weights on this machine: a randomly initialised encoder runs at the same speed.
# (jsonargparse reads a nested `...init_args.weights null` as the string "None"; the JSON form works.)
# `{semseg}`: the shared Duke file converted to the MIRAGE layout (see duke_semseg).
MIRAGE_ARGS = ["--model.init_args.net", '{"init_args": {"weights": null}}', "--data.init_args.root", "{semseg}"]
# The shared retouch_like sample: two Spectralis cases whose paths name no vendor, too few for a test split.
RETOUCH_SHARED_ARGS = ["--data.init_args.vendor", "Spectralis", "--data.init_args.test_fraction", "0"]

RECIPES = [
    Recipe(
        "vessel U-Net (DRIVE)",
        "hparams/vessel_unet.json",
        cpu_args=["--model.init_args.net.init_args.base_channels", "8", "--model.init_args.net.init_args.depth", "3",
                  "--data.init_args.patch_size", "128", "--data.init_args.patches_per_image", "8"],
    ),
    Recipe(
        "ISIC DeepLabV3+ r50 (PH2)",
        "hparams/isic_deeplabv3plus.json",
        cpu_args=["--model.init_args.net.init_args.encoder_name", "resnet18", "--data.init_args.batch_size", "4",
                  "--data.init_args.image_size", "[128, 128]"],
    ),
    Recipe(
        "OCT SegFormer-b0 layers (Duke DME)",
        "hparams/oct_segformer.json",
        cpu_args=["--data.init_args.batch_size", "4", "--data.init_args.image_size", "128",
                  "--data.init_args.output_width", "128", "--model.init_args.net.init_args.output_width", "128"],
    ),
    Recipe(
        "MIRAGE-Base frozen + ConvNeXt decoder (Duke DME)",
        "hparams/duke_dme_foundation.json",
        gpu_args=MIRAGE_ARGS,
        cpu_args=[*MIRAGE_ARGS, "--model.init_args.net.init_args.preset", "tiny", "--data.init_args.batch_size", "2"],
    ),
    Recipe(
        "RETOUCH U-Net patches",
        "hparams/retouch_unet.json",
        gpu_args=RETOUCH_SHARED_ARGS,
        cpu_args=[*RETOUCH_SHARED_ARGS, "--model.init_args.net.init_args.base_channels", "8",
                  "--data.init_args.batch_size", "8"],
    ),
]  # fmt: skip


class StepTimer(L.Callback):
    """Images/s of the training steps after a warm-up: wall time including the data loading between
    steps, and on the CPU also the steps alone (what the framework adds around the loop's work).

    The GPU is synchronised only where the timed window starts and ends: a synchronisation after every
    step would stop the CPU from queueing the next step while the GPU runs, which the plain loop does.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.samples = 0
        self.start: float | None = None
        self.end = 0.0
        self.step_seconds = 0.0
        self._step_start = 0.0
        self.peak_mem = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self._sync()
            self.start = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is None:
            return
        self.samples += len(batch["image"])
        if trainer.global_step >= (trainer.max_steps if trainer.max_steps > 0 else float("inf")):
            self._sync()
            if torch.cuda.is_available():
                self.peak_mem = torch.cuda.max_memory_allocated() / 2**30
        self.end = time.perf_counter()
        self.step_seconds += self.end - self._step_start

    @property
    def images_per_s(self) -> float:
        return self.samples / (self.end - self.start) if self.start else float("nan")

    @property
    def step_images_per_s(self) -> float:
        if torch.cuda.is_available() or not self.step_seconds:
            return float("nan")  # unsynchronised GPU steps have no meaningful duration of their own
        return self.samples / self.step_seconds


class EpochOverhead(L.Callback):
    """Wall time of a whole fit against the sum of its training-step times (data waits excluded)."""

    def __init__(self) -> None:
        self.step_seconds = 0.0
        self.start: float | None = None
        self.end = 0.0
        self._t = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        if self.start is None:
            self.start = self._now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_seconds += self._now() - self._t

    def on_train_end(self, trainer, pl_module):
        self.end = self._now()

    @property
    def overhead(self) -> float:
        return (self.end - self.start) / self.step_seconds - 1


def vessel_epoch_overhead(epochs: int, cpu: bool, out_dir: Path, overrides: list[str]) -> str:
    """The vessel recipe on the 20-image DRIVE set, whole images: epochs of wall time vs step time."""
    recipe = RECIPES[0]
    extra = [*(recipe.cpu_args if cpu else recipe.gpu_args), "--data.init_args.patch_size", "null",
             "--data.init_args.patches_per_image", "1", "--trainer.max_epochs", str(epochs),
             "--trainer.accelerator", "cpu" if cpu else "gpu", "--trainer.devices", "1", *overrides]  # fmt: skip
    cli = build_cli(recipe, extra, out_dir)
    timer = EpochOverhead()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return (
        f"Vessel recipe, {epochs} epochs of the DRIVE training split (whole images, no validation): "
        f"{timer.end - timer.start:.1f} s wall, {timer.step_seconds:.1f} s in training steps, "
        f"per-epoch overhead {timer.overhead:.1%} (target <= 10 %)."
    )


def build_cli(recipe: Recipe, extra: list[str], root_dir: Path) -> OctLightningCLI:
    """The recipe's fit as ``octlightning fit`` builds it: its loggers (CSV, Comet offline archive),
    checkpoints and progress bar included; no validation, overlays or frozen encoder, so that the steps
    do the same work as the plain loop."""
    root = json.loads((REPO / recipe.config).read_text())["data"]["init_args"].get("root", "")
    if root.startswith("../shared/data/"):
        extra = ["--data.init_args.root", str(SHARED_DATA / root.removeprefix("../shared/data/")), *extra]
    args = ["--config", str(REPO / recipe.config), "--overlay_every_n_epochs", "0",
            "--trainer.default_root_dir", str(root_dir),
            "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0",
            "--early_stopping_patience", "null", "--trainer.callbacks", "[]", *extra]  # fmt: skip
    return OctLightningCLI(args=args, run=False)


def _target_and_loss(out: torch.Tensor | dict[str, torch.Tensor], task: L.LightningModule):
    """Random targets shaped like the recipe's output, and the recipe's own loss function.

    The same loss on both sides: a plain script of the recipe computes its Dice + CE too, and the
    comparison is about what the framework adds around it.
    """
    if isinstance(out, dict):  # soft-argmax boundary head: rows + row logits, the task's CE + L1
        h = out["row_logits"].shape[2]
        t = torch.rand_like(out["rows"], dtype=torch.float32) * (h - 1)
        valid = torch.ones_like(t, dtype=torch.bool)
        return t, lambda o, t: task.loss(o["rows"].float() * h, o["row_logits"], {"coords": t, "valid": valid})
    if out.dim() == 3:  # (B, L, W) boundary coordinates, masked regression
        kind = getattr(task, "loss_kind", "mse")
        return torch.rand_like(out, dtype=torch.float32) * 100, lambda o, t: masked_regression_loss(
            o.float(), t, torch.ones_like(t, dtype=torch.bool), kind
        )
    if out.shape[1] == 1:
        t = (torch.rand_like(out, dtype=torch.float32) > 0.9).float()
    else:
        t = torch.randint(0, out.shape[1], (out.shape[0], 1, *out.shape[2:]), device=out.device)
    return t, lambda o, t: task.loss_fn(o, t)


def plain_loop(task: L.LightningModule, x: torch.Tensor, steps: int, warmup: int, best: bool) -> tuple[float, float]:
    """Images/s and peak GiB of a written-out training loop of ``task.net`` on a fixed device batch."""
    device = x.device
    net = task.net.to(device).train()
    if hasattr(task, "loss_fn"):
        task.loss_fn.to(device)
    if best:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, **fused)
    forward = net
    if best:
        try:
            compiled = torch.compile(net)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                compiled(x)
            forward = compiled
        except Exception as err:  # SegFormer does not compile today; measure it eagerly
            warnings.warn(f"torch.compile failed ({type(err).__name__}); (b) runs eagerly", stacklevel=2)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if best else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        out = forward(x)
    target, loss_fn = _target_and_loss(out, task)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        with autocast:
            out = forward(x)
        loss = loss_fn(out, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return steps * x.shape[0] / seconds, peak


def loader_only(cli: OctLightningCLI, batches: int, max_warmup_batches: int = 500) -> float:
    """Images/s of the training loader alone, after one epoch (at most ``max_warmup_batches``) of warm-up.

    The warm-up starts the persistent workers and fills their decoded-sample caches, as the first
    epoch of a fit does; what is timed is what every later epoch gets.
    """
    dm = cli.datamodule
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(min(len(loader), max_warmup_batches)):
        next(it)
    n, start = 0, time.perf_counter()
    while n < batches * dm.batch_size:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += len(batch["image"])
    ips = n / (time.perf_counter() - start)
    dm.close_train_loader()
    return ips


def duke_semseg(out_dir: Path) -> Path:
    """The shared Duke DME file in the MIRAGE layout (converted once into the benchmark folder)."""
    from octlightning.conversion.h5_to_mirage import convert_h5

    target = out_dir / "duke_dme_semseg"
    source = SHARED_DATA / "duke_dme" / "duke_dme_trainval.h5"
    if not (target / "INFO.json").is_file() and source.is_file():
        convert_h5(source, target)
    return target


def run(recipes: list[Recipe], cpu: bool, steps: int, warmup: int, out_dir: Path, overrides: list[str]) -> str:
    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    rows, loader_rows = [], []
    for recipe in recipes:
        extra = recipe.cpu_args if device.type == "cpu" else recipe.gpu_args
        if any("{semseg}" in a for a in extra):
            extra = [a.replace("{semseg}", str(duke_semseg(out_dir))) for a in extra]
        extra = [*extra, "--trainer.accelerator", device.type, "--trainer.devices", "1", *overrides]
        try:
            cli = build_cli(recipe, extra, out_dir)
            dm = cli.datamodule
            dm.setup("fit")
            batch = next(iter(dm.train_dataloader()))
            dm.close_train_loader()  # its workers would idle beside the measurements
        except (SystemExit, Exception) as err:  # data or a library (SimpleITK) absent here, a broken config
            print(f"skip {recipe.name}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        x = batch["image"].to(device)
        base_state = {k: v.clone() for k, v in cli.model.net.state_dict().items()}

        a_before, mem_a = plain_loop(cli.model, x, steps, warmup, best=False)
        b, mem_b = (float("nan"), float("nan"))
        if device.type == "cuda":
            cli.model.net.load_state_dict(base_state)
            b, mem_b = plain_loop(cli.model, x, steps, warmup, best=True)

        fit_cli = build_cli(recipe, [*extra, "--trainer.max_steps", str(warmup + steps),
                                     "--trainer.max_epochs", "-1"], out_dir)  # fmt: skip
        timer = StepTimer(warmup)
        fit_cli.trainer.callbacks.append(timer)
        fit_cli.trainer.fit(fit_cli.model, fit_cli.datamodule)
        c = timer.images_per_s

        # (a) again after (c), averaged with the first: a machine whose speed drifts (shared CPU,
        # clocks) then biases the ratio far less than a single measurement on one side of (c).
        cli.model.net.load_state_dict(base_state)
        a_after, _ = plain_loop(cli.model, x, steps, warmup, best=False)
        a = (a_before + a_after) / 2
        rows.append((recipe.name, tuple(x.shape), a, mem_a, b, mem_b, c, timer.peak_mem, timer.step_images_per_s))
        loader_rows.append((recipe.name, loader_only(build_cli(recipe, extra, out_dir), steps), c))

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"Measured {datetime.date.today()} on {gpu}, torch {torch.__version__}, python {platform.python_version()}, "
        f"{steps} steps after {warmup} warm-up steps.",
        "",
        "| recipe | batch | (a) plain fp32 img/s | (b) plain best img/s | (c) octlightning fit img/s | c/a | c/b "
        "| (c) steps only img/s (CPU) | steps/a | peak GiB a / b / c |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape, a, ma, b, mb, c, mc, cs in rows:
        lines.append(
            f"| {name} | {'x'.join(map(str, shape))} | {a:.1f} | {b:.1f} | {c:.1f} | {c / a:.2f} | {c / b:.2f} "
            f"| {cs:.1f} | {cs / a:.2f} | {ma:.1f} / {mb:.1f} / {mc:.1f} |"
        )
    lines += [
        "",
        "| DataModule (training loader, augmentation on) | loader img/s | (c) fit img/s | loader / (c) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {ips:.1f} | {c:.1f} | {ips / c:.1f} |" for name, ips, c in loader_rows]
    return "\n".join(lines)


def main() -> None:
    global SHARED_DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small networks on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--recipes", nargs="*", default=None, help="substrings of recipe names to run")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--shared-data", default=str(SHARED_DATA), help="folder holding drive/, duke_dme/, ...")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the vessel overhead run (0 skips)")
    parser.add_argument(
        "--set",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="extra CLI override for every recipe, e.g. --set data.init_args.num_workers 0",
    )
    args = parser.parse_args()
    SHARED_DATA = Path(args.shared_data).resolve()
    steps = args.steps or (20 if args.cpu else 50)
    warmup = args.warmup or (3 if args.cpu else 10)
    recipes = [r for r in RECIPES if not args.recipes or any(s.lower() in r.name.lower() for s in args.recipes)]
    torch.set_float32_matmul_precision("high")
    overrides = [item for key, value in args.set for item in (f"--{key}", value)]
    table = run(recipes, args.cpu, steps, warmup, Path(args.out), overrides)
    epochs = args.epochs if args.epochs is not None else (5 if args.cpu else 50)
    if epochs and (not args.recipes or any("vessel" in r.lower() for r in args.recipes)):
        try:
            table += "\n\n" + vessel_epoch_overhead(epochs, args.cpu, Path(args.out), overrides)
        except (SystemExit, Exception) as err:  # DRIVE absent here
            print(f"skip the vessel overhead run: {type(err).__name__}: {err}", file=sys.stderr)
    # The fits' progress bars share stdout: the table also goes to a file of its own.
    out = Path(args.out) / f"bench-{'cpu' if args.cpu else 'gpu'}-{datetime.date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"\n{table}\n\n(also written to {out})")


if __name__ == "__main__":
    main()
