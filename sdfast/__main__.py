"""`python -m sdfast ...`: the same command line as the `sdfast` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
