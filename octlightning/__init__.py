"""octlightning: Lightning recipes for ophthalmic image segmentation.

Importing the package applies the offline defaults (see :mod:`octlightning.env`) before any
hub-aware library (transformers, albumentations, comet_ml) is imported, and keeps two messages of
Lightning's off the console (:func:`octlightning.env.quiet_dependency_noise`).
"""

from octlightning.env import apply_offline_defaults, quiet_dependency_noise

apply_offline_defaults()
quiet_dependency_noise()

__version__ = "0.1.0"
