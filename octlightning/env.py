"""Offline-by-default environment, and two dependency messages kept off the console.

Hubs are unreachable on the machines this package runs on, and an experiment must never wait on the
network. Each variable is set only when the user has not set it already.
"""

from __future__ import annotations

import logging
import os
import warnings

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "COMET_DISABLE_AUTO_LOGGING": "1",
}


def comet_online() -> bool:
    """Comet runs online only when the user gave an API key."""
    return bool(os.environ.get("COMET_API_KEY"))


def apply_offline_defaults() -> dict[str, str]:
    """Set the offline defaults where unset; return what was set."""
    applied = {}
    defaults = dict(OFFLINE_DEFAULTS)
    if not comet_online():
        defaults["COMET_START_ONLINE"] = "false"
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


class _DropCloudTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... litlogger / litmodels" adverts for its cloud services."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_dependency_noise() -> None:
    """Keep two messages of our dependencies off every run's console.

    - Lightning advertises its cloud services (litlogger, litmodels) at every run, twice: unreachable
      offline, and nothing a researcher acts on. Its other messages stay.
    - Lightning's pytree copy constructs ``LeafSpec``, which torch 2.14 deprecates with a FutureWarning
      at every run: Lightning's to fix, nothing the user can change.
    """
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropCloudTips())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
