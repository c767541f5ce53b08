"""A command stopped by SIGTERM (``timeout``, ``scancel``, a sweep's Ctrl-C), in any stage: recorded so that
``octlightning`` exits with SIGTERM's status, and without the loader workers' deaths raised on top."""

from __future__ import annotations

import signal
import threading
from typing import ClassVar

import lightning as L


def ended_by_sigterm(trainer: L.Trainer, exception: BaseException) -> bool:
    """Whether ``exception`` ends a run that SIGTERM stopped.

    Lightning's own ``SIGTERMException`` (raised between batches once its handler saw the signal), any
    error raised after that handler ran, or torch's ``RuntimeError: DataLoader worker ... is killed by
    signal: Terminated``: a SIGTERM to the process group also kills the loader workers, and the main
    process may raise their death before its own handler has run.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return (
        isinstance(exception, SIGTERMException)
        or getattr(trainer, "received_sigterm", False)
        or "killed by signal: Terminated" in str(exception)
    )


def stop_raising_loader_worker_deaths() -> None:
    """Let the run stop without torch raising each loader worker's death at whatever line runs next.

    torch's DataLoader installs a SIGCHLD handler in the main process that raises ``RuntimeError:
    DataLoader worker ... is killed by signal`` from inside the signal handler. After a SIGTERM to the
    process group every worker (training and validation loaders) dies, and the second death arrived
    while ``last.ckpt`` was being pickled: the save failed and the run was lost. The process is
    stopping; the workers' deaths are expected, so SIGCHLD goes back to its default (ignored).
    """
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class SigtermStop(L.Callback):
    """Records which command SIGTERM stopped in this process (``octlightning`` reads it and exits 143).

    Lightning stops fit, validate and test after the batch in progress with ``SIGTERMException``, a
    ``SystemExit`` of status 0: without this, ``timeout 3600 octlightning test ... && report`` went on
    to report on a test that wrote no results, and a sweep called such a stage done. Saving the fit is
    :class:`~octlightning.callbacks.LastCheckpoint`'s job.
    """

    #: The trainer function (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``) stopped, or None.
    stopped: ClassVar[str | None] = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if ended_by_sigterm(trainer, exception):
            SigtermStop.stopped = trainer.state.fn.value if trainer.state.fn is not None else "run"
            stop_raising_loader_worker_deaths()
