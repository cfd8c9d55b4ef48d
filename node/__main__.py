"""`python -m node` runs the telenode command line."""

import sys

from node.cli import main

sys.exit(main())
