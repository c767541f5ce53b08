"""LightningCLI for ``fit``/``validate``/``test``/``predict``: run folders, Comet, checkpoints, and the data->model
links of :mod:`octlightning.links` applied before the model is built.

``octlightning fit --config hparams/vessel_unet.json`` trains, validates and checkpoints into
``runs/<experiment>/<version>/`` (``<experiment>`` defaults to the config file name). The model and
the data are chosen by ``class_path`` in the config; every key can be overridden on the command line
(``--model.init_args.lr 5e-5``). The console entry point is :mod:`octlightning.commands`.

One job, past 400 lines: the hooks of one LightningCLI subclass (run folder, loggers, the callbacks
every run gets, resumption) read each other's state; the data links (:mod:`octlightning.links`) and the
parser's messages (:mod:`octlightning.parser`) live apart.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from copy import deepcopy
from fnmatch import fnmatch
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_registry import _is_registry

import octlightning  # noqa: F401  (applies the offline environment defaults first)
from octlightning.callbacks import BeatConstantBaseline, LastCheckpoint, LogOverlays, SigtermStop
from octlightning.checkpoints import require_checkpoint_fits, require_torch_file
from octlightning.errors import ConfigError
from octlightning.links import link_data_to_model
from octlightning.loggers import CometLogger, CSVLogger
from octlightning.parser import OctArgumentParser

RUN_DIR_ENV = "OCTLIGHTNING_RUN_DIR"
# Where test and predict of a run's own checkpoint write inside that run's folder (see stage_dir).
STAGE_FOLDERS = {"test": "test", "predict": "predictions"}
# Progress bar refresh interval in training steps (a user's own progress-bar callback wins).
PROGRESS_BAR_REFRESH_STEPS = 10

# The trainer settings every recipe shares (a recipe's JSON sets only what is its own, such as
# max_epochs); `trainer.precision: null` means bf16-mixed on a bf16-capable GPU, else 32-true.
TRAINER_DEFAULTS: dict[str, Any] = {"log_every_n_steps": 5, "default_root_dir": "runs"}
SEED_DEFAULT = 42


def is_checkpoint_keyword(ckpt_path: str | os.PathLike) -> bool:
    """Whether ``ckpt_path`` is one of Lightning's ``ckpt_path`` keywords rather than a file:
    ``"best"``, ``"last"``, ``"hpc"``, or a model-registry reference (``"registry"``, ``"registry:..."``)."""
    return str(ckpt_path) in ("best", "last", "hpc") or _is_registry(str(ckpt_path))


def checkpoint_run_dir(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<name>.ckpt`` -> ``<run>``), else None."""
    if not ckpt_path or is_checkpoint_keyword(ckpt_path):
        return None
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints" or not (path.parent.parent / "config.yaml").is_file():
        return None
    return path.parent.parent


def resumes_in_place(ckpt_path: str | os.PathLike | None, run_dir: Path) -> bool:
    """Whether ``ckpt_path`` is a checkpoint of ``run_dir`` itself (a fit then resumes that run in place)."""
    owner = checkpoint_run_dir(ckpt_path)
    return owner is not None and owner.resolve() == run_dir.resolve()


def latest_resumable_version(experiment_dir: Path) -> str | None:
    """The version folder under ``experiment_dir`` whose ``checkpoints/last.ckpt`` was written last, or None."""
    candidates = [p for p in experiment_dir.glob("*/checkpoints/last.ckpt") if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime_ns).parent.parent.name


def next_version(experiment_dir: Path) -> str:
    """``version_<N>`` with N one above the highest existing version folder."""
    numbers = [
        int(m.group(1))
        for p in (experiment_dir.iterdir() if experiment_dir.is_dir() else [])
        if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    return f"version_{max(numbers, default=-1) + 1}"


def default_precision() -> str:
    """bf16 mixed precision where the GPU supports it, full precision elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class OctLightningCLI(LightningCLI):
    """LightningCLI with the octlightning run conventions.

    Added options (top level of the config):
        experiment: run-folder name under ``trainer.default_root_dir`` (default: the config file stem).
        version: run-folder version (default: the next ``version_N``). Naming an existing version whose
            ``checkpoints/last.ckpt`` exists resumes it when ``fit`` gets no ``--ckpt_path``; one without
            it starts over, the earlier files moved to ``earlier-<time>/`` inside it;
            ``--ckpt_path last`` without it resumes the latest saved version (see :meth:`_run_location`).
            ``test``/``predict`` of a run's own checkpoint write into that run (see :meth:`stage_dir`).
        comet: log to Comet (online with ``COMET_API_KEY``, else an offline archive in the run folder).
        comet_project: Comet project (default: the experiment name).
        comet_tags: Comet experiment tags (sweeps tag each run with the sweep name and its overrides).
        overlay_every_n_epochs: write overlay images of the first validation batch every N epochs.
        early_stopping_patience: stop when the monitored metric has not improved for N validations.
        checkpoint_every_s: refresh ``last.ckpt`` at the first epoch end after this many seconds (0: every
            epoch); it is also written when training ends and on SIGTERM (see ``LastCheckpoint``).

    ``trainer.precision: null`` means ``bf16-mixed`` on a bf16-capable GPU, else ``32-true``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        # Each run has its own version folder; overwrite only matters when a run is resumed in place.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", SEED_DEFAULT)
        kwargs.setdefault("parser_class", OctArgumentParser)
        # argparse would expand a typo such as --trainer.max_epoch to --trainer.max_epochs unannounced.
        parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
        parser_kwargs.setdefault("allow_abbrev", False)
        for subcommand in self.subcommands():
            parser_kwargs[subcommand] = {"allow_abbrev": False, **parser_kwargs.get(subcommand, {})}
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--experiment", type=str | None, default=None, help="run folder name")
        parser.add_argument("--version", type=str | None, default=None, help="run folder version")
        parser.add_argument("--comet", type=bool, default=True, help="log to Comet (offline without API key)")
        parser.add_argument("--comet_project", type=str | None, default=None, help="Comet project name")
        parser.add_argument("--comet_tags", type=list[str] | None, default=None, help="Comet experiment tags")
        parser.add_argument("--overlay_every_n_epochs", type=int, default=5, help="0 disables overlays")
        parser.add_argument("--early_stopping_patience", type=int | None, default=None)
        parser.add_argument(
            "--checkpoint_every_s",
            type=float,
            default=60.0,
            help="refresh last.ckpt at an epoch end once this many seconds have passed (0: every epoch); "
            "it is also saved when training ends and on SIGTERM",
        )

    # ------------------------------------------------------------------ data -> model
    def instantiate_datamodule(self) -> Any:
        """The DataModule of the parsed config, built alone (no model, no trainer: ``check-data``)."""
        spec = self._cfg()["data"]
        module, _, name = str(spec["class_path"]).rpartition(".")
        init_args = spec.get("init_args")
        return getattr(import_module(module), name)(**(init_args.as_dict() if init_args is not None else {}))

    def before_instantiate_classes(self) -> None:
        """Put back the model as parsed (see :meth:`parse_arguments`) and fill in what the data determines."""
        cfg = self._cfg()
        if getattr(self, "_parsed_model", None) is not None:
            cfg["model"] = self._parsed_model
        if cfg.get("model") is not None:
            link_data_to_model(cfg["model"], self.instantiate_datamodule())

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, and keep the model exactly as the config and command line give it.

        With ``--ckpt_path``, LightningCLI then overwrites the model's arguments with the hyperparameters
        saved in the checkpoint, silently undoing command-line overrides (``--model.init_args.threshold``);
        :meth:`before_instantiate_classes` puts the parsed model config back. A checkpoint that does not
        fit the configured network fails loudly at load time instead.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        self._parsed_model = deepcopy(cfg.get("model"))
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():  # LightningCLI loads it next, for its hyperparameters
            require_torch_file(ckpt_path)

    # ------------------------------------------------------------------ run folder
    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def experiment_name(self) -> str:
        cfg = self._cfg()
        if cfg.get("experiment"):
            return cfg["experiment"]
        configs = cfg.get("config") or []
        if configs:
            return Path(str(configs[0])).stem
        return type(self.model).__name__.lower()

    def _run_location(self) -> tuple[Path, str, str]:
        """``(runs root, experiment, version)`` of this command's run folder.

        ``--version`` (and ``--experiment``) name it. Otherwise ``--ckpt_path last`` means the experiment's
        version whose ``last.ckpt`` was written last (a ConfigError naming ``--version`` when there is
        none), and a ``test``/``predict`` checkpoint inside a run folder under this runs root
        (``<root>/<experiment>/<version>/checkpoints/x.ckpt``) means that run; anything else gets the next
        ``version_N``. A ``last`` checkpoint is replaced by its file.
        """
        cfg = self._cfg()
        root = Path(cfg["trainer"].get("default_root_dir") or "runs")
        name = self.experiment_name()
        inherited = os.environ.get(RUN_DIR_ENV)
        if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
            # A DDP worker started by Lightning's launcher: use the folder its rank 0 chose, which
            # may already exist (so "next version" would differ).
            run_dir = Path(inherited)
            return run_dir.parent.parent, run_dir.parent.name, run_dir.name
        version = cfg.get("version")
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path == "last":
            version = version or latest_resumable_version(root / name)
            last = root / name / str(version) / "checkpoints" / "last.ckpt"
            if version is None or not last.is_file():
                where = root / name / version if version else root / name
                raise ConfigError(
                    f"--ckpt_path last: no checkpoints/last.ckpt under {where}; name the run to resume with "
                    f"--version (and --experiment), or give --ckpt_path the checkpoint file"
                )
            self._set_ckpt_path(str(last))
        if ckpt_path != "last" and not self._names_another_run() and self.subcommand in STAGE_FOLDERS:
            owner = checkpoint_run_dir(ckpt_path)
            # A checkpoint from under another runs root (--trainer.default_root_dir) is not "this" run.
            if owner is not None and owner.parent.parent.resolve() == root.resolve():
                root, name, version = owner.parent.parent, owner.parent.name, owner.name
        version = version or next_version(root / name)
        os.environ[RUN_DIR_ENV] = str(root / name / version)
        return root, name, version

    def _require_usable_checkpoint(self, ckpt_path: str | None) -> None:
        """A ConfigError before any run folder or logger is made when the ``--ckpt_path`` file is missing
        (naming the checkpoints that do exist beside it: a run that never validated has a last.ckpt but
        no best.ckpt) or holds another task or network (another recipe's run, other net options), naming
        the config of the run it came from. Lightning's keywords (``best``, ``hpc``, ...) are its own."""
        if not ckpt_path or is_checkpoint_keyword(ckpt_path):
            return
        path = Path(ckpt_path)
        if not path.is_file():
            there = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
            hint = f"; {path.parent} holds {', '.join(there)}" if there else ""
            if path.name == "best.ckpt" and "last.ckpt" in there:
                hint += " (best.ckpt is written at the first validation: this run had none; use last.ckpt)"
            raise ConfigError(f"--ckpt_path {path}: no such checkpoint file{hint}")
        owner = checkpoint_run_dir(ckpt_path)
        if owner is not None:
            hint = f"; it comes from the run {owner}: use that run's config (--config {owner / 'config.yaml'})"
        else:
            hint = "; give a checkpoint written with this config's model and net options"
        require_checkpoint_fits(ckpt_path, self.model, hint)

    def _names_another_run(self) -> bool:
        """Whether ``--version``/``--experiment`` name a run folder other than the checkpoint's own.

        A run's saved ``config.yaml`` holds its ``experiment``: testing with it and the run's checkpoint
        names no other run, and the results go inside that run like those of the recipe's hparams file.
        """
        cfg = self._cfg()
        if cfg.get("version"):
            return True
        owner = checkpoint_run_dir(cfg.get("ckpt_path"))
        return bool(cfg.get("experiment")) and (owner is None or cfg.get("experiment") != owner.parent.name)

    def _set_ckpt_path(self, path: str) -> None:
        """Replace the command's ``--ckpt_path`` (a shorthand such as ``last``) by the file it means."""
        self._cfg()["ckpt_path"] = path
        if self.subcommand:
            self.config_init[self.subcommand]["ckpt_path"] = path

    def stage_dir(self, run_dir: Path) -> tuple[Path, Path]:
        """``(task folder, logger folder)`` of this command inside ``run_dir``.

        ``fit`` (and any command given ``--version``/``--experiment``, such as a sweep's test stage) works in
        the run folder itself. ``test`` and ``predict`` of a checkpoint inside a run folder add to that
        run without touching what ``fit`` wrote: ``test`` writes its tables, ``config.yaml`` and
        ``metrics.csv`` under ``<run>/test/``; ``predict`` writes ``<run>/predictions/`` (the task's own
        sub-folder) and keeps its ``config.yaml`` there too.
        """
        cfg = self._cfg()
        folder = STAGE_FOLDERS.get(self.subcommand or "")
        if folder is None or self._names_another_run() or checkpoint_run_dir(cfg.get("ckpt_path")) != run_dir:
            return run_dir, run_dir
        if self.subcommand == "predict":
            return run_dir, run_dir / folder
        return run_dir / folder, run_dir / folder

    # ------------------------------------------------------------------ trainer
    def instantiate_trainer(self, **kwargs: Any):
        cfg = self._cfg()
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        root, name, version = self._run_location()
        run_dir = root / name / version
        self._require_usable_checkpoint(cfg.get("ckpt_path"))
        self.run_dir = run_dir
        work_dir, log_dir = self.stage_dir(run_dir)
        if self.subcommand in ("fit", "validate", "test", "predict"):
            # Before any logger exists: a DataError must not leave a run folder or Comet archive behind.
            self._set_up_data_first(self.subcommand)
        if self.subcommand == "fit" and os.environ.get("LOCAL_RANK", "0") == "0":
            self._set_aside_an_unresumable_fit(run_dir)
        elif log_dir != run_dir and os.environ.get("LOCAL_RANK", "0") == "0":  # a test/predict stage folder
            self._set_aside_earlier_results(log_dir)

        # The run folder is the trainer's root: checkpoints without a logger, SLURM's hpc_ckpt files
        # and every table the tasks write stay inside this run (the config's value is the runs root).
        kwargs["default_root_dir"] = str(work_dir)
        if trainer_cfg.get("precision") is None:
            kwargs["precision"] = default_precision()
        if trainer_cfg.get("benchmark") is None and torch.cuda.is_available():
            kwargs["benchmark"] = True  # fixed input sizes: let cuDNN pick the fastest kernels
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")

        logger = trainer_cfg.get("logger")
        if logger is None or logger is True:
            loggers: list = [CSVLogger(save_dir=str(log_dir.parent), name="", version=log_dir.name)]
            # fast_dev_run replaces loggers anyway; do not start a Comet experiment for it.
            if cfg.get("comet") and not trainer_cfg.get("fast_dev_run"):
                suffix = "" if log_dir == run_dir else f"/{log_dir.name}"
                loggers.append(
                    CometLogger(
                        offline_directory=str(log_dir),
                        project=cfg.get("comet_project") or name,
                        name=f"{name}/{version}{suffix}",
                        tags=cfg.get("comet_tags"),
                    )
                )
            kwargs["logger"] = loggers
        elif log_dir != work_dir:
            # Without a logger Lightning would save config.yaml in the task folder, over fit's own.
            self.save_config_callback = None

        callbacks = list(trainer_cfg.get("callbacks") or [])
        monitor = getattr(self.model, "monitor", None)
        mode = getattr(self.model, "monitor_mode", "min")
        user_checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
        # Checkpoints and early stopping belong to fit: in test/predict they save nothing, and Lightning
        # would restore the fit's callback states into them ("The dirpath has changed ..." warnings).
        # Without a subcommand (``run=False``) the caller fits.
        fitting = self.subcommand not in ("validate", "test", "predict")
        if fitting and all(isinstance(c, LastCheckpoint) for c in user_checkpoints):  # LastCheckpoint alone: add best
            # best.ckpt holds the weights only (a third of a full checkpoint: no optimiser state), as
            # it is written whenever validation improves; it is what test/predict load.
            callbacks.append(
                ModelCheckpoint(
                    filename="best",
                    monitor=monitor,
                    mode=mode,
                    save_top_k=1,
                    save_weights_only=True,
                    auto_insert_metric_name=False,
                )
            )
        if fitting and not any(isinstance(c, LastCheckpoint) or c.save_last for c in user_checkpoints):
            # Separate from best.ckpt: Lightning 2.6 refreshes `save_last` only when a top-k checkpoint
            # was saved, so a run whose metric stops improving would resume from its best epoch.
            callbacks.append(LastCheckpoint(every_s=cfg.get("checkpoint_every_s", 60.0)))
        if trainer_cfg.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            # Every progress-bar refresh reads the step loss with .item(), a wait for the GPU; at
            # Lightning's default of every step it stops the CPU from queueing the next step.
            callbacks.append(TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS))
        if kwargs.get("logger", logger) not in (False, None) and not any(
            isinstance(c, LearningRateMonitor) for c in callbacks
        ):
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        if cfg.get("overlay_every_n_epochs", 0) > 0:
            callbacks.append(LogOverlays(every_n_epochs=cfg["overlay_every_n_epochs"]))
        if fitting and cfg.get("early_stopping_patience") is not None and monitor:
            callbacks.append(
                octlightning.callbacks.WarmupEarlyStopping(monitor, patience=cfg["early_stopping_patience"])
            )
        if not any(isinstance(c, SigtermStop) for c in callbacks):
            callbacks.append(SigtermStop())  # a command SIGTERM stopped exits 143, not 0 (see commands.main)
        if fitting and not any(isinstance(c, BeatConstantBaseline) for c in callbacks):
            callbacks.append(BeatConstantBaseline())  # a run that learns nothing says so (every recipe)
        kwargs["callbacks"] = callbacks
        if self.subcommand != "fit" and log_dir == run_dir and (run_dir / "config.yaml").is_file():
            # test/predict given a fit's --version (a sweep's test stage) work in that run folder: its
            # config.yaml is the record of how the run was trained; this command's goes beside it.
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config-{self.subcommand}.yaml"}
        return super().instantiate_trainer(**kwargs)

    def _set_up_data_first(self, first: str) -> None:
        """Run the DataModule's ``setup(first)`` now, and make the trainer's own call a no-op.

        The data checks (missing, unreadable or unmatched files) raise DataError here, before the loggers
        create the run folder (or a test's ``<run>/test/``) and the Comet archive; the work is not done twice.
        """
        datamodule = self.datamodule
        if datamodule is None or "setup" in vars(datamodule):
            return
        datamodule.setup(first)
        original = type(datamodule).setup

        def setup(stage: str) -> None:  # Lightning passes stage= by name
            del datamodule.setup  # once: later stages (test after fit) set up as usual
            if stage != first:
                original(datamodule, stage)

        datamodule.setup = setup

    def _load_checkpoints_safely(self) -> None:
        """``--ckpt_path`` files load with ``weights_only=True`` unless the user says otherwise.

        torch's own default has changed between releases; a checkpoint from elsewhere must not be able
        to run code when it is unpickled.
        """
        cfg = self.config_init[self.subcommand]
        if "weights_only" in cfg and cfg["weights_only"] is None:
            cfg["weights_only"] = True

    def _evaluate_a_checkpoint(self) -> None:
        """What validate, test and predict do before they load ``--ckpt_path`` (and say without one)."""
        self._load_checkpoints_safely()
        if self.config_init[self.subcommand].get("ckpt_path") is None:
            # Not an error: a smoke test of a config may mean it. But figures of an untrained network
            # must not pass for a result unannounced.
            warnings.warn(
                f"{self.subcommand} without --ckpt_path uses the network as the config builds it, untrained "
                f"(random weights, or a pretrained encoder's alone); give --ckpt_path "
                f"<run>/checkpoints/best.ckpt to {self.subcommand} what a fit learned",
                stacklevel=2,
            )
        # A fit's checkpoint holds its training callbacks' states (checkpointing, early stopping), which
        # only a fit restores; Lightning's "callbacks used to create the checkpoint need to be provided"
        # concerns resuming, not evaluating.
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")

    def before_validate(self) -> None:
        self._evaluate_a_checkpoint()

    def before_test(self) -> None:
        self._evaluate_a_checkpoint()

    def before_predict(self) -> None:
        self._evaluate_a_checkpoint()
        # Tasks write their predictions to the run folder (and callbacks get each batch's outputs);
        # collecting every batch's outputs in memory as well would only grow with the dataset.
        cfg = self.config_init["predict"]
        if cfg.get("return_predictions") is None:
            cfg["return_predictions"] = False

    def _set_aside_an_unresumable_fit(self, run_dir: Path) -> None:
        """Move an earlier fit's files out of the way when this fit starts over in its folder.

        ``--version k`` resumes k from ``checkpoints/last.ckpt`` (or SLURM's ``hpc_ckpt_*.ckpt``). A fit
        killed before it saved one, or a new fit from other weights named into k, starts over: its rows
        would follow the earlier fit's in ``metrics.csv`` and its best checkpoint become ``best-v1.ckpt``.
        The earlier files go to ``<run>/earlier-<time>/`` instead, and the command says so.
        """
        # A supervisor's files (a sweep's status.json and logs, SLURM's output) span attempts: they stay.
        kept = ("earlier-*", "status.json", ".status.json.*", "*.log", "slurm-*")
        entries = run_dir.iterdir() if run_dir.is_dir() else []
        earlier = [e for e in entries if not any(fnmatch(e.name, pattern) for pattern in kept)]
        if not earlier:
            return
        ckpt_path = self._cfg().get("ckpt_path")
        resumable = (run_dir / "checkpoints" / "last.ckpt").is_file() or any(run_dir.glob("hpc_ckpt_*.ckpt"))
        if (ckpt_path in (None, "hpc") and resumable) or resumes_in_place(ckpt_path, run_dir):
            return  # before_fit (or Lightning's SLURM restore) resumes this run in place
        aside = _move_to_earlier(run_dir, earlier)
        print(
            f"octlightning: {run_dir} holds an earlier fit with no last.ckpt to resume (stopped before its first "
            f"save, or this fit starts from other weights); starting over, its files moved to {aside}",
            file=sys.stderr,
        )

    def _set_aside_earlier_results(self, folder: Path) -> None:
        """Move an earlier ``test``'s (or ``predict``'s) files in a run's stage ``folder`` to
        ``<folder>/earlier-<time>/`` before this command writes there: its files would replace some of
        them, and a stop part-way left one command's config.yaml beside the other's results."""
        earlier = [e for e in folder.iterdir() if not e.name.startswith("earlier-")] if folder.is_dir() else []
        if earlier:
            aside = _move_to_earlier(folder, earlier)
            print(f"octlightning: {self.subcommand}: the earlier results in {folder} moved to {aside}", file=sys.stderr)

    def _say_where(self, what: str, folder: Path) -> None:
        # Run folders are numbered versions: tell the user which one this command wrote.
        if self.trainer.is_global_zero:
            print(f"octlightning: {self.subcommand}: {what} in {folder}", file=sys.stderr)

    def after_fit(self) -> None:
        folder = self.run_dir / "checkpoints"
        names = sorted(p.name for p in folder.glob("*.ckpt"))
        missing = "" if "best.ckpt" in names else "; no best.ckpt: no validation ran, test/predict its last.ckpt"
        self._say_where(f"checkpoints ({', '.join(names) or 'none'}{missing})", folder)

    def after_test(self) -> None:
        self._say_where("metrics.csv and per-sample tables", Path(self.trainer.default_root_dir))

    def after_predict(self) -> None:
        self._say_where("predictions", Path(self.trainer.default_root_dir) / "predictions")

    def before_fit(self) -> None:
        """Resume automatically when the named run folder already holds ``last.ckpt``; say where the run writes."""
        self._load_checkpoints_safely()
        fit_cfg = self.config_init["fit"]
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if fit_cfg.get("ckpt_path") is None and self._cfg().get("version") and last.is_file():
            fit_cfg["ckpt_path"] = str(last)
        ckpt_path = fit_cfg.get("ckpt_path")
        in_place = resumes_in_place(ckpt_path, self.run_dir)
        if in_place:  # Lightning's "Checkpoint directory ... exists and is not empty" is then expected
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        if os.environ.get("LOCAL_RANK", "0") != "0":  # before DDP's launch ranks are not set up: local rank 0 says it
            return
        if in_place:
            print(f"octlightning: resuming {self.run_dir} from {ckpt_path}", file=sys.stderr)
        else:  # said at the start, not only at the end: a run killed on day three is resumed by its version
            how = f"; if it stops, the same command with --version {self.run_dir.name} resumes it"
            print(f"octlightning: fit: writing {self.run_dir}{'' if ckpt_path else how}", file=sys.stderr)


def _move_to_earlier(folder: Path, entries: list[Path]) -> Path:
    """Move ``entries`` of ``folder`` into a new ``<folder>/earlier-<time>/``; returns it."""
    aside = folder / time.strftime("earlier-%Y%m%d-%H%M%S")
    n = 1
    while aside.exists():  # two set-asides within a second
        aside, n = folder / time.strftime(f"earlier-%Y%m%d-%H%M%S-{n}"), n + 1
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    return aside


def run_cli(args: list[str] | None = None) -> OctLightningCLI:
    """Run one CLI command in this process and return the CLI (trainer, model, datamodule)."""
    return OctLightningCLI(args=args)


class _ParserBuilt(Exception):
    def __init__(self, parser: LightningArgumentParser) -> None:
        super().__init__("parser built")
        self.parser = parser


def argument_parser(**parser_kwargs: Any) -> LightningArgumentParser:
    """The CLI's parser with its subcommands, built without parsing or instantiating anything.

    ``argument_parser().parse_args(["fit", "--config", ...])`` checks a command line as ``fit`` would
    (sweeps validate every run this way before starting one). ``parser_kwargs`` go to the parsers,
    e.g. ``exit_on_error=False`` (errors as exceptions).
    """

    class _ParserOnly(OctLightningCLI):
        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            raise _ParserBuilt(parser)  # LightningCLI.__init__ would parse and instantiate next

    subcommands = {name: dict(parser_kwargs) for name in ("fit", "validate", "test", "predict")}
    try:
        _ParserOnly(args=[], parser_kwargs={**parser_kwargs, **subcommands})
    except _ParserBuilt as built:
        return built.parser
    raise AssertionError("LightningCLI did not call parse_arguments")  # pragma: no cover
