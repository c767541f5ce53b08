"""Offline-by-default environment.

Hubs are unreachable on the machines this package runs on, and an experiment must never wait on the
network. Each variable is set only when the user has not set it already.
"""

from __future__ import annotations

import os

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
