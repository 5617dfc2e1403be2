"""`python -m lmforge ...` (what `torchrun -m lmforge ...` runs on every rank): the `lmforge` command line."""

import sys

from lmforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
