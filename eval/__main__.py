"""`python -m eval ...` is `clip-eval ...`."""

import sys

from eval.cli import main

sys.exit(main())
