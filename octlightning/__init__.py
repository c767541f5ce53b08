"""octlightning: Lightning recipes for ophthalmic image segmentation.

Importing the package applies the offline defaults (see :mod:`octlightning.env`) before any
hub-aware library (transformers, albumentations, comet_ml) is imported.
"""

from octlightning.env import apply_offline_defaults

apply_offline_defaults()

__version__ = "0.1.0"
