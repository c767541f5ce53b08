"""Errors octlightning raises for the user to act on (this module imports nothing of ours)."""

from __future__ import annotations


class DataError(ValueError):
    """The dataset on disk is not what the DataModule expects.

    The message names the file(s), what is wrong with them and, where one exists, the option that
    fixes it. The CLI prints it as one line without a traceback and exits with status 1.
    """


class ConfigError(ValueError):
    """The config contradicts itself or the data (e.g. a class count the dataset does not have).

    The message names the config key(s) and both values. The CLI prints it as one line and exits 1.
    """
