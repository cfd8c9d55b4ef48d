"""`python -m node` runs the telenode command line."""

import sys

from node.cli import main

if __name__ == "__main__":  # not when a worker process (spawn) imports the main module
    sys.exit(main())
