"""Loggers: a CSV logger that survives resumption and kills, and Comet logging that works offline.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder already has files, so a run resumed
in place would lose the metrics of every epoch before the interruption. :class:`CSVLogger` here
appends to it instead, and rewrites it (when a new column appears) through a temporary file, so a
kill during the rewrite cannot truncate it.

Lightning 2.6's ``CometLogger(online=False)`` passes ``disabled=True`` to Comet, so nothing is
written anywhere. :class:`CometLogger` here keeps the experiment enabled, writes the offline archive
(``<experiment key>.zip``, uploadable later with ``comet upload``) into the run folder, and ends the
experiment when the run finishes so the archive is complete. Comet gathers an offline experiment in
a temporary folder and zips it only at the end; here that folder is ``<run>/.comet/``, so a killed
run's data stays in the run folder, and the next logger started there (the resumed run) zips it
into the killed experiment's own archive.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
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

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning truncates metrics.csv and writes it again: a kill in between would lose every row.
        path = Path(self.metrics_file_path)
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)


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

        offline_dir = None if self._want_online else self._comet_config.offline_directory
        scratch = None
        if offline_dir:
            # Comet opens the archive at start; the run folder may not exist yet.
            Path(offline_dir).mkdir(parents=True, exist_ok=True)
            scratch = Path(offline_dir) / SCRATCH_DIR
            salvage_killed_experiments(Path(offline_dir))
            scratch.mkdir(exist_ok=True)
        previous = tempfile.tempdir
        try:
            if scratch is not None:
                # Comet's working folder comes from tempfile.mkdtemp(): put it in the run folder.
                tempfile.tempdir = str(scratch)
            self._experiment = comet_ml.start(
                workspace=self._workspace,
                project=self._project_name,
                experiment_key=self._experiment_key,
                mode=self._mode,
                online=self._want_online,
                experiment_config=self._comet_config,
            )
        finally:
            tempfile.tempdir = previous
        self._experiment_key = self._experiment.get_key()
        self._project_name = self._experiment.project_name
        work = getattr(self._experiment, "tmpdir", None)
        if scratch is not None and work and Path(work).parent == scratch:
            # What a salvage needs if this process is killed: the archive's metadata and who owns it.
            self._experiment._write_experiment_meta_file()
            owner = {"pid": os.getpid(), "host": os.uname().nodename,
                     "archive": self._experiment._get_offline_archive_file_name()}  # fmt: skip
            Path(f"{work}.pid").write_text(json.dumps(owner))

    @override
    @rank_zero_only
    def save(self) -> None:
        """Wait until everything logged so far is in the offline folder (Comet writes from a thread)."""
        streamer = getattr(self._experiment, "streamer", None)
        queue = getattr(streamer, "messages", None)
        if self._want_online or queue is None:
            return
        deadline = time.monotonic() + 30
        while not queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        lock = getattr(streamer, "__write_lock__", None)
        if lock is not None and lock.acquire(timeout=10):  # the message being written, if any
            lock.release()

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
        work = getattr(self._experiment, "tmpdir", None)
        self._experiment.end()
        self._experiment = None
        if work:
            Path(f"{work}.pid").unlink(missing_ok=True)


SCRATCH_DIR = ".comet"


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the process an owner file names may still be running."""
    if owner.get("host") != os.uname().nodename:
        return True  # another machine's process: not ours to judge
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def salvage_killed_experiments(offline_directory: Path) -> list[Path]:
    """Zip the Comet folders that killed processes left in ``<offline_directory>/.comet/`` into archives.

    Each becomes the archive Comet created (empty) when that experiment started,
    ``<offline_directory>/<experiment key>[-<suffix>].zip``, uploadable with ``comet upload`` like any
    other: the killed run's metrics up to the kill are kept as their own experiment. Folders of live
    processes are left alone. Returns the archives written.
    """
    scratch = offline_directory / SCRATCH_DIR
    written = []
    for owner in sorted(scratch.glob("*.pid")) if scratch.is_dir() else []:
        work = owner.with_suffix("")
        meta_path = work / "experiment.json"
        info = json.loads(owner.read_text())
        if _alive(info) or not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        files = [p for p in work.iterdir() if p.is_file()]
        # Comet's timestamps are milliseconds; the last write is when the killed run stopped logging.
        meta["stop_time"] = int(max(p.stat().st_mtime for p in files) * 1000)
        meta_path.write_text(json.dumps(meta))
        archive = offline_directory / info["archive"]  # the (empty) archive Comet opened at the start
        tmp = archive.with_name(f".{archive.name}.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in files:
                zf.write(path, path.name)
        os.replace(tmp, archive)
        shutil.rmtree(work)
        owner.unlink()
        print(f"octlightning: archived the Comet data of a killed run as {archive}", file=sys.stderr)
        written.append(archive)
    return written
