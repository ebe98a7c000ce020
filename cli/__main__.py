"""`python -m cli ARGS`: the `svdq-jax` command line."""

import sys

from cli.main import main

sys.exit(main())
