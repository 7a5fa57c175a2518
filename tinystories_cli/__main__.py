"""`python -m tinystories_cli` is the same as the `tslm` command."""

import sys

from tinystories_cli.cli import main

if __name__ == "__main__":
    sys.exit(main())
