"""`python -m rnnkit` runs the `rnnkit` command: see `rnnkit.cli`."""

import sys

from rnnkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
