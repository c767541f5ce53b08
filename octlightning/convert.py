"""``python -m octlightning.convert <converter> ...``: the dataset converters of :mod:`octlightning.conversion`."""

import sys

from octlightning.conversion import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m octlightning.convert"))
