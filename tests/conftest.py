"""Shared fixtures: datasets written in their real on-disk layouts, the shared real data, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import octlightning  # noqa: F401  (offline defaults before anything else imports hub libraries)
from octlightning.conversion.synthetic import write_drive_layout

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(path: str) -> Path:
    """A path under ../shared/data; the test is skipped when it is absent."""
    p = SHARED_DATA / path
    if not p.exists():
        pytest.skip(f"shared data {p} not present")
    return p


@pytest.fixture(scope="session")
def drive_root(tmp_path_factory) -> Path:
    """A DRIVE-layout set: 9 training images (ids 21-29), 2 test images, 64 x 72 px."""
    return write_drive_layout(tmp_path_factory.mktemp("drive"), n_train=9, n_test=2, size=(64, 72), seed=1)


# One CPU process, quiet: what every CLI test runs on.
CPU_TRAINER = [
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip

# Shrinks the vessel recipe to something a 2-core CPU runs in seconds.
TINY_VESSEL = [
    "--model.init_args.net.init_args.base_channels", "4",
    "--model.init_args.net.init_args.depth", "2",
    "--data.init_args.num_workers", "0",
    "--data.init_args.batch_size", "2",
    *CPU_TRAINER,
]  # fmt: skip


def run_octlightning(args: list[str], cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process (needed for DDP)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "octlightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"octlightning {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
