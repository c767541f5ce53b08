"""Interrupted runs lose nothing: SIGKILL resumes from last.ckpt, SIGTERM saves before exiting."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

from octlightning.cli import OctLightningCLI, run_cli
from tests.conftest import REPO, TINY_VESSEL, run_octlightning

CONFIG = str(REPO / "hparams" / "vessel_unet.json")


def _fit_args(drive_root: Path, runs: Path, version: str, epochs: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", CONFIG, "--data.init_args.root", str(drive_root), *TINY_VESSEL,
        "--trainer.default_root_dir", str(runs), "--version", version, "--comet", "false",
        "--overlay_every_n_epochs", "0", "--trainer.check_val_every_n_epoch", "1", "--checkpoint_every_s", "0",
        "--trainer.max_epochs", str(epochs), "--data.init_args.patch_size", "32",
        "--data.init_args.patches_per_image", "8", *extra,
    ]  # fmt: skip


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "octlightning", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONWARNINGS="ignore"), start_new_session=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read().decode()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


def _wait_for_step_after(path: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the checkpoint at ``path`` records a global step above ``step``."""
    start = time.time()
    while True:
        try:
            if _ckpt(path)["global_step"] > step:
                return
        except (EOFError, RuntimeError, OSError):
            pass  # caught while being rewritten: look again
        if proc.poll() is not None or time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} recorded no step after {step} (run ended or {timeout} s passed)")
        time.sleep(0.2)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _epochs_with(rows: list[dict], key: str) -> list[int]:
    return sorted(int(r["epoch"]) for r in rows if r.get(key))


def _comet_text(archive: Path) -> str:
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith((".json", ".jsonl"))]
        return "\n".join(zf.read(n).decode("utf-8", "replace") for n in names)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_ends_like_an_uninterrupted_run(drive_root, tmp_path):
    """SIGKILL right after ``last.ckpt`` records epoch 0 as done (KillAfterLastCheckpoint, no timing):
    epoch 0's rows are already in ``metrics.csv``, its Comet data survives as its own archive, and the
    same command resumes and ends where an uninterrupted run ends."""
    epochs = 3
    run_octlightning(_fit_args(drive_root, tmp_path, "clean", epochs))
    clean = tmp_path / "vessel_unet" / "clean"

    killed = tmp_path / "vessel_unet" / "killed"
    kill = '[{"class_path": "tests.fault_injection.KillAfterLastCheckpoint", "init_args": {"epochs": 1}}]'
    args = _fit_args(drive_root, tmp_path, "killed", epochs, "--trainer.callbacks", kill)
    args[args.index("--comet") + 1] = "true"  # offline: the test environment has no COMET_API_KEY
    env = {k: v for k, v in os.environ.items() if k != "COMET_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "octlightning", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(env, PYTHONWARNINGS="ignore"), timeout=600)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _ckpt(killed / "checkpoints" / "last.ckpt")["epoch"] == 1
    rows = _rows(killed)
    # What last.ckpt calls finished is on disk: epoch 0's validation and its training means.
    assert _epochs_with(rows, "val/dice") == [0] and _epochs_with(rows, "train/loss_epoch") == [0]
    (owner,) = (killed / ".comet").glob("*.pid")  # Comet's working folder stayed in the run folder
    killed_archive = killed / json.loads(owner.read_text())["archive"]

    resumed = subprocess.run([sys.executable, "-m", "octlightning", *args], cwd=REPO, capture_output=True, text=True,
                             env=dict(env, PYTHONWARNINGS="ignore"), timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in (clean, killed):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    for key in ("epoch", "global_step"):
        assert _ckpt(killed / "checkpoints" / "last.ckpt")[key] == _ckpt(clean / "checkpoints" / "last.ckpt")[key]
    rows = _rows(killed)
    assert _epochs_with(rows, "val/dice") == list(range(epochs)), "each epoch's metrics once, none lost"
    assert _epochs_with(rows, "train/loss_epoch") == list(range(epochs))

    # The killed process's Comet data is kept as its own archive; the resumed process has its own.
    assert not list((killed / ".comet").iterdir())
    archives = sorted(killed.glob("*.zip"))
    assert len(archives) == 2, archives
    assert '"val/dice"' in _comet_text(killed_archive) and "train/loss" in _comet_text(killed_archive)
    with zipfile.ZipFile(killed_archive) as zf:
        meta = json.loads(zf.read("experiment.json"))
    assert killed_archive.name.startswith(meta["offline_id"]) and meta["stop_time"] >= meta["start_time"]
    (other,) = [a for a in archives if a != killed_archive]
    assert '"val/dice"' in _comet_text(other)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_saves_a_checkpoint_and_exits_with_one_line(drive_root, tmp_path, workers):
    """The signal goes to the process group, as timeout, a terminal's Ctrl-C or scancel send it: with
    loader workers they die of it too, and torch raised their deaths in the main process at any line,
    the pickling of last.ckpt included (the save failed; a run killed during its first validation was
    lost). The command saves, says so, and exits with SIGTERM's status without a traceback."""
    run = tmp_path / "vessel_unet" / "term"
    proc = _start(_fit_args(drive_root, tmp_path, "term", 50, "--data.init_args.num_workers", str(workers)))
    _wait_for(run / "checkpoints" / "last.ckpt", proc)
    step_at_epoch_end = _ckpt(run / "checkpoints" / "last.ckpt")["global_step"]
    # Training has gone on past that checkpoint once the next epoch's last.ckpt records a later step:
    # an event to wait for, not a time (a loaded machine may take seconds per step).
    _wait_for_step_after(run / "checkpoints" / "last.ckpt", step_at_epoch_end, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert "SIGTERM received, saved" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # neither a crash nor a success (Lightning's SIGTERMException is a SystemExit with status 0)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "fit stopped by SIGTERM" in out
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] > step_at_epoch_end


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_test_stopped_by_sigterm_exits_with_sigterms_status_and_one_line(drive_root, tmp_path, workers):
    """Lightning stops test after the batch in progress with its SIGTERMException, a SystemExit of status
    0: `timeout ... test && report` went on to report, and a sweep called the stage done, without any
    test_metrics.csv."""
    run_cli(_fit_args(drive_root, tmp_path, "t", 1))
    run = tmp_path / "vessel_unet" / "t"
    args = _fit_args(drive_root, tmp_path, "t", 1, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    args = ["test", *args[1:], "--data.init_args.eval_batch_size", "1", "--data.init_args.num_workers", str(workers)]
    proc = _start([*args, "--trainer.callbacks+=tests.fault_injection.SigtermDuringTest"])
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "octlightning: test stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
    assert not list(run.rglob("test_metrics.csv"))


@pytest.mark.slow
def test_one_failing_ddp_rank_ends_every_rank_with_the_original_error(drive_root, tmp_path):
    args = _fit_args(drive_root, tmp_path, "fault", 5, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    args += ["--model.init_args.net.init_args.batch_norm", "false"]
    args += ["--trainer.callbacks+=tests.fault_injection.RaiseOnRank"]
    start = time.time()
    proc = _start(args)
    try:
        out = proc.communicate(timeout=180)[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the surviving rank hung after the other failed") from None
    assert proc.returncode != 0
    assert "injected failure on rank 1" in out
    assert time.time() - start < 180


def test_same_config_and_seed_give_the_same_validation_metrics_on_cpu(drive_root, tmp_path):
    rows = []
    for version in ("a", "b"):
        run_cli(_fit_args(drive_root, tmp_path, version, 2, "--data.init_args.patches_per_image", "2"))
        metrics = tmp_path / "vessel_unet" / version / "metrics.csv"
        rows.append([{k: v for k, v in r.items() if k.startswith("val/")} for r in csv.DictReader(open(metrics))])
    assert rows[0] == rows[1]
    assert any(r.get("val/loss") for r in rows[0])


class _CountSaves(L.Callback):
    """Records the global step of every checkpoint written to last.ckpt."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if "optimizer_states" in checkpoint:  # best.ckpt holds weights only
            self.steps.append(checkpoint["global_step"])


def _fit_counting_saves(drive_root: Path, runs: Path, version: str, every_s: str) -> tuple[list[int], int]:
    args = _fit_args(drive_root, runs, version, 3, "--data.init_args.patches_per_image", "2")
    args[args.index("--checkpoint_every_s") + 1] = every_s
    counter = _CountSaves()
    cli = OctLightningCLI(args=args[1:], run=False)  # without the subcommand: fit is called below
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, cli.datamodule)
    return counter.steps, cli.trainer.global_step


def test_last_checkpoint_is_refreshed_by_time_and_always_written_when_training_ends(drive_root, tmp_path):
    steps, final_step = _fit_counting_saves(drive_root, tmp_path, "slow", "3600")
    assert steps == [final_step], "no epoch-end save inside the interval, one when training ends"
    assert _ckpt(tmp_path / "vessel_unet" / "slow" / "checkpoints" / "last.ckpt")["global_step"] == final_step

    steps, final_step = _fit_counting_saves(drive_root, tmp_path, "every", "0")
    assert len(steps) == 3 and steps[-1] == final_step, "0 saves after every epoch, and not twice at the end"


def test_best_checkpoint_holds_weights_and_loads_for_test(drive_root, tmp_path):
    run_cli(_fit_args(drive_root, tmp_path, "w", 1, "--data.init_args.patches_per_image", "2"))
    best = tmp_path / "vessel_unet" / "w" / "checkpoints" / "best.ckpt"
    ckpt = _ckpt(best)
    assert "state_dict" in ckpt and "optimizer_states" not in ckpt
    cli = run_cli(["test", *_fit_args(drive_root, tmp_path, "w_test", 1)[1:], "--ckpt_path", str(best)])
    assert (Path(cli.trainer.default_root_dir) / "test_metrics.csv").is_file()


def test_a_users_own_checkpoint_callback_keeps_the_resumable_last_checkpoint(drive_root, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from octlightning.callbacks import LastCheckpoint

    own = '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/dice", "mode": "max", "save_top_k": 3}}]'  # noqa: E501
    args = _fit_args(drive_root, tmp_path, "own", 1, "--trainer.callbacks", own)
    cli = OctLightningCLI(args=args[1:], run=False)
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 2 and sum(isinstance(c, LastCheckpoint) for c in checkpoints) == 1
    cli.trainer.fit(cli.model, cli.datamodule)
    assert (tmp_path / "vessel_unet" / "own" / "checkpoints" / "last.ckpt").is_file()
