"""The learning-rate schedules span the training length: max_epochs/max_steps, or a max_time budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Timer
from torch import nn

from octlightning.errors import ConfigError
from octlightning.tasks.segmentation import SegmentationTask


def _task(scheduler: str = "cosine", warmup_epochs: int = 1) -> SegmentationTask:
    return SegmentationTask(net=nn.Conv2d(1, 1, 1), num_classes=1, scheduler=scheduler, warmup_epochs=warmup_epochs)


def _trainer(total: float, callbacks: list) -> SimpleNamespace:
    # what schedule_span reads of a Trainer: 4 training batches per epoch
    return SimpleNamespace(
        estimated_stepping_batches=total, num_training_batches=4, accumulate_grad_batches=1, callbacks=callbacks
    )


def test_the_schedule_spans_max_epochs_after_the_warm_up():
    task = _task()
    task._trainer = _trainer(40.0, [])  # 10 epochs of 4 steps
    warmup, span = task.schedule_span()
    assert warmup == 4 and span(3) == 0.0 and span(4) == 0.0 and span(22) == 0.5 and span(40) == 1.0


def test_max_time_beside_max_epochs_warns_that_the_schedule_may_not_decay():
    """A new user's trial: a fit with the recipe's max_epochs 100 and --trainer.max_time 00:00:02:00 ends with
    the cosine barely begun, and nothing said so."""
    task = _task()
    task._trainer = _trainer(400.0, [Timer(duration={"minutes": 2})])
    with pytest.warns(UserWarning, match=r"spans 400 steps .*--trainer.max_epochs -1 .*span max_time"):
        task.schedule_span()


def test_a_time_budget_run_decays_the_learning_rate_with_the_trainers_clock(monkeypatch):
    """``max_epochs: -1`` + ``max_time``: at half the budget the cosine is at half, at the end at zero,
    however many steps that took (the accuracy benchmark trains this way)."""
    timer = Timer(duration={"seconds": 100})
    clock = {"elapsed": 0.0}
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": clock["elapsed"])
    task = _task()
    task._trainer = _trainer(float("inf"), [timer])
    warmup, span = task.schedule_span()
    assert warmup == 4 and span(2) == 0.0
    clock["elapsed"] = 50.0
    assert span(10) == 0.5 and span(1000) == 0.5
    clock["elapsed"] = 150.0  # a resumed run's Timer counts the time before the stop too
    assert span(11) == 1.0
    step = _task("step", 0)
    step._trainer = _trainer(float("inf"), [timer])
    assert step.schedule_span()[0] == 0


def test_a_schedule_without_a_training_length_is_an_error():
    task = _task()
    task._trainer = _trainer(float("inf"), [])
    length = "needs a training length: --trainer.max_epochs, --trainer.max_steps or --trainer.max_time"
    with pytest.raises(ConfigError, match=length):
        task.schedule_span()
