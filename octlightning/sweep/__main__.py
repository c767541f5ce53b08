"""``python -m octlightning.sweep``: what each SLURM array task runs (``--task runs.json <i>``)."""

import sys

from octlightning.sweep import main

sys.exit(main())
