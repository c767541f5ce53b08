"""Lightning callbacks, one module per job; every public name is importable from here.

Configs name them by this package (``"class_path": "octlightning.callbacks.FreezeBackbone"``), so a
callback may move between the modules below without breaking a config:

- :mod:`.checkpoints`: :class:`LastCheckpoint`, the resumable ``last.ckpt``.
- :mod:`.sigterm`: :class:`SigtermStop`, which command SIGTERM stopped (for the exit status).
- :mod:`.finetuning`: :class:`FreezeBackbone`, the pretrained encoder frozen, then fine-tuned.
- :mod:`.training_checks`: :class:`WarmupEarlyStopping`, :class:`BeatConstantBaseline` and the
  :func:`constant_prediction_loss` it compares with.
- :mod:`.scores`: :class:`ThresholdedJaccard`, the ISIC 2018 test score.
- :mod:`.writers`: :class:`LogOverlays`, :class:`WriteVolumes`, :class:`WriteMiragePredictions`.
"""

from octlightning.callbacks.checkpoints import LastCheckpoint
from octlightning.callbacks.finetuning import FreezeBackbone
from octlightning.callbacks.scores import ThresholdedJaccard
from octlightning.callbacks.sigterm import SigtermStop
from octlightning.callbacks.training_checks import BeatConstantBaseline, WarmupEarlyStopping, constant_prediction_loss
from octlightning.callbacks.writers import LogOverlays, WriteMiragePredictions, WriteVolumes

__all__ = [
    "BeatConstantBaseline",
    "FreezeBackbone",
    "LastCheckpoint",
    "LogOverlays",
    "SigtermStop",
    "ThresholdedJaccard",
    "WarmupEarlyStopping",
    "WriteMiragePredictions",
    "WriteVolumes",
    "constant_prediction_loss",
]
