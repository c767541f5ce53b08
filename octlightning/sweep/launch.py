"""One stage of one run as a child process, and the run's ``status.json``.

Shared by the local scheduler (:mod:`.local`) and the SLURM array task (:mod:`.slurm`): both start a
stage with :func:`launch` and record its end with :func:`finish`, so a run folder looks the same
wherever it ran. ``status.json`` says which stages are done; a run whose stages are all done is skipped.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from octlightning.sweep.spec import Run, Sweep

STAGES = ("fit", "test")
# What starts one CLI command; tests replace it to run a stand-in program.
CLI_COMMAND = [sys.executable, "-m", "octlightning"]


def now() -> str:
    """Local time for log lines and ``status.json``."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_status(run_dir: Path) -> dict[str, Any]:
    """A run's ``status.json``; ``{}`` when it has none (or a half-written one from an old version)."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """Atomic write: a reader (a report, another SLURM task) never sees half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".status.json.{os.getpid()}"
    tmp.write_text(json.dumps(status, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / "status.json")


def pending_stages_from(sweep: Sweep, status: dict[str, Any]) -> list[str]:
    """The stages (fit, test) a run still has to do according to its status."""
    return [s for s in sweep.stages if s not in status.get("stages_done", [])]


def pending_stages(sweep: Sweep, run: Run) -> list[str]:
    """The stages a run still has to do according to its ``status.json``."""
    return pending_stages_from(sweep, read_status(sweep.run_dir(run)))


@dataclass
class Child:
    """A started stage of a run."""

    run: Run
    stage: str
    proc: subprocess.Popen
    logs: list[TextIO]
    slot: int
    started: float


def launch(
    sweep: Sweep, run: Run, stage: str, env: dict[str, str], prefix: list[str], hardware: list[str], slot: int
) -> Child:
    """Start one stage of a run in its own process group, output appended to the run's log files.

    ``prefix`` goes before the CLI command (``srun ...`` in a SLURM task); the test stage loads the
    run's ``best.ckpt``, else its ``last.ckpt``. Returns the :class:`Child`; :func:`finish` closes it.
    """
    run_dir = sweep.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if stage == "test":
        best = run_dir / "checkpoints" / "best.ckpt"
        ckpt = best if best.is_file() else run_dir / "checkpoints" / "last.ckpt"
    cmd = [*prefix, *CLI_COMMAND, *sweep.cli_args(run, stage, hardware, ckpt)]
    status = read_status(run_dir)
    attempts = dict(status.get("attempts") or {})
    attempts[stage] = attempt = attempts.get(stage, 0) + 1
    header = f"\n=== {now()} {stage} attempt {attempt}: {shlex.join(cmd)}\n"
    logs = [open(run_dir / "stdout.log", "a"), open(run_dir / "stderr.log", "a")]  # closed in finish
    for log in logs:
        log.write(header)
        log.flush()
    # An argument list, never a shell string; a new session so that stopping it reaches its whole tree.
    proc = subprocess.Popen(
        cmd, cwd=sweep.cwd, env=env, stdout=logs[0], stderr=logs[1], stdin=subprocess.DEVNULL, start_new_session=True
    )
    status.update(
        id=run.id,
        sweep=sweep.name,
        overrides=run.overrides,
        state="running",
        stage=stage,
        attempts=attempts,
        pid=proc.pid,
        devices=env.get("CUDA_VISIBLE_DEVICES"),
        host=os.uname().nodename,
        started=now(),
        command=cmd,
    )
    status.setdefault("stages_done", [])
    write_status(run_dir, status)
    return Child(run, stage, proc, logs, slot, time.monotonic())


def finish(sweep: Sweep, child: Child, returncode: int, interrupted: bool = False) -> str:
    """Record how a stage ended; returns the run's new state (done, pending, failed, interrupted)."""
    for log in child.logs:
        log.close()
    run_dir = sweep.run_dir(child.run)
    status = read_status(run_dir)
    status.update(returncode=returncode, ended=now(), pid=None)
    if interrupted:
        status["state"] = "interrupted"
    elif returncode == 0:
        status["stages_done"] = sorted(set(status.get("stages_done", [])) | {child.stage}, key=STAGES.index)
        status["state"] = "done" if not pending_stages_from(sweep, status) else "pending"
        status.pop("failed_stage", None)
    else:
        status["state"] = "failed"
        status["failed_stage"] = child.stage
    write_status(run_dir, status)
    return status["state"]


def describe_exit(returncode: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL`` (a negative return code is the signal)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_process_groups(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every child's process group (the child saves ``last.ckpt`` and exits), SIGKILL what is
    left after ``grace`` seconds, including processes the child started (loader workers, DDP ranks)."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
