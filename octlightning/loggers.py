"""Loggers: a CSV logger that survives resumption, and Comet logging that works offline.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder already has files, so a run resumed
in place would lose the metrics of every epoch before the interruption. :class:`CSVLogger` here
appends to it instead.

Lightning 2.6's ``CometLogger(online=False)`` passes ``disabled=True`` to Comet, so nothing is
written anywhere. :class:`CometLogger` here keeps the experiment enabled, writes the offline archive
(``<experiment key>.zip``, uploadable later with ``comet upload``) into the run folder, and ends the
experiment when the run finishes so the archive is complete.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CometLogger as _LightningCometLogger
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from octlightning.env import comet_online


class _AppendingExperimentWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (and its columns) and appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])


class CSVLogger(_LightningCSVLogger):
    """``metrics.csv`` + ``hparams.yaml`` in the run folder; appends when a run is resumed in place."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class CometLogger(_LightningCometLogger):
    """Comet logger: online when ``COMET_API_KEY`` is set (or ``online=True``), else an offline archive.

    Args:
        offline_directory: where the offline archive goes (the CLI passes the run folder).
        project: Comet project name (sweeps share one).
        online: force online/offline; ``None`` decides from ``COMET_API_KEY``.
        name: experiment name shown on the dashboard.
        tags: experiment tags.
        **kwargs: further ``comet_ml.ExperimentConfig`` options.

    The API key is never taken as an argument, so it cannot end up in a saved config: Comet reads it
    from the environment or its own config file.
    """

    def __init__(
        self,
        offline_directory: str | None = None,
        project: str | None = None,
        online: bool | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self._want_online = comet_online() if online is None else online
        config = dict(kwargs)
        if offline_directory is not None:
            config["offline_directory"] = offline_directory
        if name is not None:
            config["name"] = name
        if tags:
            config["tags"] = list(tags)
        config.setdefault("display_summary_level", 0)
        if not self._want_online:
            # Host and network details need DNS look-ups that fail (slowly) on offline machines.
            config.setdefault("log_env_host", False)
            config.setdefault("log_env_network", False)
        # online=None keeps the parent from disabling the experiment; _create_experiment decides.
        super().__init__(project=project, online=None, **config)

    @override
    def _create_experiment(self) -> None:
        import comet_ml

        if not self._want_online and self._comet_config.offline_directory:
            # Comet opens the archive at start; the run folder may not exist yet.
            Path(self._comet_config.offline_directory).mkdir(parents=True, exist_ok=True)
        self._experiment = comet_ml.start(
            workspace=self._workspace,
            project=self._project_name,
            experiment_key=self._experiment_key,
            mode=self._mode,
            online=self._want_online,
            experiment_config=self._comet_config,
        )
        self._experiment_key = self._experiment.get_key()
        self._project_name = self._experiment.project_name

    @property
    def online(self) -> bool:
        return self._want_online

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        # End the experiment: for offline runs this is what writes the archive. A later stage in the
        # same process (fit, then test) starts a fresh experiment.
        if self._experiment is None:
            return
        self._experiment.end()
        self._experiment = None
