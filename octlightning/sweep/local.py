"""The local scheduler: a sweep's runs queued onto GPU groups or CPU slots of this machine, resumable.

One run per slot at a time; a run's stages (fit, then test) follow each other on its slot. A run that
fails is reported and the others go on. Ctrl-C or SIGTERM stops every child's whole process tree;
running the sweep again skips finished runs and resumes the others from their ``last.ckpt``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from octlightning.sweep.launch import (
    Child,
    describe_exit,
    finish,
    launch,
    now,
    pending_stages,
    stop_process_groups,
)
from octlightning.sweep.spec import Run, Sweep, SweepError, validate


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join("      " + line for line in [t for t in text if t.strip()][-lines:])


def slot_devices(gpus: str | None, gpus_per_run: int, slots: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each slot: GPU groups of ``gpus_per_run``, or ``slots`` CPU slots ("")."""
    if not gpus:
        return [""] * max(1, slots)
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if len(ids) < gpus_per_run:
        raise SweepError(f"--gpus {gpus}: {len(ids)} GPU(s) given but each run takes {gpus_per_run}")
    if len(ids) % gpus_per_run:
        print(f"sweep: {len(ids) % gpus_per_run} GPU(s) of {gpus} left idle ({gpus_per_run} per run)", flush=True)
    return [",".join(ids[i : i + gpus_per_run]) for i in range(0, len(ids) - gpus_per_run + 1, gpus_per_run)]


def local_hardware(sweep: Sweep, gpus: str | None) -> list[str]:
    """The CLI hardware arguments of a local run: ``gpus_per_run`` GPUs with ``--gpus``, else one CPU."""
    if gpus:
        return ["--trainer.accelerator", "gpu", "--trainer.devices", str(sweep.gpus_per_run)]
    return ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]


class _SweepLock:
    """One scheduler per sweep folder at a time (two would start the same runs twice)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / ".lock", "w")  # released in __exit__

    def __enter__(self) -> _SweepLock:
        import fcntl

        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise SweepError(f"{self.file.name}: another `octlightning sweep` is running this sweep") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


def run_local(
    sweep: Sweep, gpus: str | None = None, slots: int = 1, grace: float = 30.0, poll: float = 0.2
) -> dict[str, str]:
    """Run every unfinished run, as many at once as there are slots; returns ``{run id: state}``.

    Runs that fail are reported and the others go on. On Ctrl-C (or SIGTERM) the children get SIGTERM,
    then SIGKILL after ``grace`` seconds; their runs are marked interrupted and resume next time, and
    the ``KeyboardInterrupt`` goes on to the caller. Raises :class:`SweepError` for runs over several
    nodes (those need SLURM), too few GPUs, a run that does not parse, or a sweep already running.
    """
    if sweep.nodes_per_run > 1:
        raise SweepError(f"sweep {sweep.name!r}: runs over {sweep.nodes_per_run} nodes need --slurm")
    devices = slot_devices(gpus, sweep.gpus_per_run, slots)
    hardware = local_hardware(sweep, gpus)
    validate(sweep, hardware)
    threads = str(max(1, (os.cpu_count() or 1) // len(devices)))
    where = f"GPU groups {devices}" if gpus else f"{len(devices)} CPU slot(s)"
    unit = "GPU" if gpus else "CPU slot"
    states: dict[str, str] = {}
    running: dict[int, Child] = {}

    def start(run: Run, slot: int) -> None:
        stage = pending_stages(sweep, run)[0]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=devices[slot], PYTHONUNBUFFERED="1")
        if not gpus:
            env.setdefault("OMP_NUM_THREADS", threads)  # parallel CPU runs must not oversubscribe the cores
        resume = stage == "fit" and (sweep.run_dir(run) / "checkpoints" / "last.ckpt").is_file()
        running[slot] = launch(sweep, run, stage, env, [], hardware, slot)
        note = " (resuming from last.ckpt)" if resume else ""
        print(f"[{now()}] start {run.id} {stage} on {unit} {devices[slot] or slot}{note}", flush=True)

    def finished(slot: int, child: Child, returncode: int) -> None:
        state = finish(sweep, child, returncode)
        states[child.run.id] = state
        took = time.monotonic() - child.started
        if state == "failed":
            log = sweep.run_dir(child.run) / "stderr.log"
            print(
                f"[{now()}] FAILED {child.run.id} {child.stage} ({describe_exit(returncode)}, {took:.0f} s); "
                f"see {log}:\n{_tail(log)}",
                flush=True,
            )
            return
        print(f"[{now()}] finished {child.run.id} {child.stage} ({took:.0f} s)", flush=True)
        if state == "pending":  # the next stage (test) of the same run, on the same slot
            start(child.run, slot)

    with _SweepLock(sweep.folder):
        queue = [run for run in sweep.runs if pending_stages(sweep, run)]
        states.update({run.id: "done" for run in sweep.runs if run not in queue})
        print(
            f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(states)} already done, {len(queue)} to run on "
            f"{where} -> {sweep.folder}",
            flush=True,
        )
        previous = _install_sigterm_handler()
        try:
            while queue or running:
                for slot in range(len(devices)):
                    if slot not in running and queue:
                        start(queue.pop(0), slot)
                for slot, child in list(running.items()):
                    returncode = child.proc.poll()
                    if returncode is not None:
                        del running[slot]
                        finished(slot, child, returncode)
                time.sleep(poll)
        except KeyboardInterrupt:
            print(f"\nsweep {sweep.name}: interrupted, stopping {len(running)} run(s)", flush=True)
            stop_process_groups([child.proc for child in running.values()], grace)
            for child in running.values():
                finish(sweep, child, child.proc.returncode, interrupted=True)
                print(f"  {child.run.id}: stopped, resumes from last.ckpt next time", flush=True)
            raise
        finally:
            _restore_sigterm_handler(previous)
    return states


def _install_sigterm_handler() -> Any:
    """SIGTERM to the scheduler (kill, a batch system) stops the children like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm_handler(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
