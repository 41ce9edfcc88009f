"""``python -m rnnjax``: the command line."""

import sys

from rnnjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
